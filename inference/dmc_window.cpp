#include "inference/dmc_window.h"

#include <algorithm>

namespace dmc::inference {

template <typename T>
DmcWindow<T>::DmcWindow(int window, int head_dim)
    : window_(window), head_dim_(head_dim),
      keys_(static_cast<size_t>(window) * head_dim), values_(keys_.size()), omegas_(window) {}

template <typename T>
void DmcWindow<T>::Push(const T* key, const T* value, T omega) {
  const int D = head_dim_;
  int slot;
  if (count_ < window_) {
    slot = (start_ + count_++) % window_;
  } else {
    slot = start_;
    start_ = (start_ + 1) % window_;
  }
  std::copy(key, key + D, keys_.begin() + static_cast<long>(slot) * D);
  std::copy(value, value + D, values_.begin() + static_cast<long>(slot) * D);
  omegas_[slot] = omega;
}

template <typename T>
void DmcWindow<T>::Mean(T* key, T* value) const {
  const int D = head_dim_;
  double denom = 0;
  for (int e = 0; e < count_; ++e) denom += omegas_[(start_ + e) % window_];
  for (int c = 0; c < D; ++c) {
    double k_sum = 0, v_sum = 0;
    for (int e = 0; e < count_; ++e) {
      const int slot = (start_ + e) % window_;
      k_sum += static_cast<double>(omegas_[slot]) * keys_[static_cast<long>(slot) * D + c];
      v_sum += static_cast<double>(omegas_[slot]) * values_[static_cast<long>(slot) * D + c];
    }
    key[c] = static_cast<T>(k_sum / denom);
    value[c] = static_cast<T>(v_sum / denom);
  }
}

template class DmcWindow<float>;
template class DmcWindow<double>;

}  // namespace dmc::inference
