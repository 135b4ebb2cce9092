#include "inference/dmc_cache.h"

namespace dmc::inference {

template <typename T>
DmcCache<T>::DmcCache(int layers, int kv_heads, int head_dim, int window)
    : kv_heads_(kv_heads), head_dim_(head_dim), window_(window),
      heads_(static_cast<size_t>(layers) * kv_heads) {}

template <typename T>
void DmcCache<T>::Add(int layer, int h, const T* key, const T* value, T omega, bool merge) {
  Head& hd = head(layer, h);
  const int D = head_dim_;
  if (!merge || hd.values.empty()) {
    hd.window.clear();
    hd.keys.resize(hd.keys.size() + D);
    hd.values.resize(hd.values.size() + D);
  }
  hd.window.push_back({std::vector<T>(key, key + D), std::vector<T>(value, value + D), omega});
  if (static_cast<int>(hd.window.size()) > window_) hd.window.pop_front();
  // Open slot = omega-weighted mean of the window (the training scan with hard decisions).
  double denom = 0;
  for (const auto& e : hd.window) denom += e.omega;
  T* k_slot = hd.keys.data() + hd.keys.size() - D;
  T* v_slot = hd.values.data() + hd.values.size() - D;
  for (int c = 0; c < D; ++c) {
    double k_sum = 0, v_sum = 0;
    for (const auto& e : hd.window) {
      k_sum += static_cast<double>(e.omega) * e.key[c];
      v_sum += static_cast<double>(e.omega) * e.value[c];
    }
    k_slot[c] = static_cast<T>(k_sum / denom);
    v_slot[c] = static_cast<T>(v_sum / denom);
  }
}

template <typename T>
T* DmcCache<T>::open_key(int layer, int h) {
  Head& hd = head(layer, h);
  return hd.keys.data() + hd.keys.size() - head_dim_;
}

template <typename T>
long DmcCache<T>::total_slots() const {
  long n = 0;
  for (const Head& hd : heads_) n += static_cast<long>(hd.values.size()) / head_dim_;
  return n;
}

template class DmcCache<float>;
template class DmcCache<double>;

}  // namespace dmc::inference
