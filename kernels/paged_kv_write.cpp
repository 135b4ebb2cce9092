#include "kernels/paged_kv_write.h"

#include <algorithm>
#include <vector>

#include "kernels/rope.h"

namespace dmc::kernels {
namespace {

// Stores key (rotated at pos) and value as slot `slot` of head `head`.
template <typename T>
void StoreSlot(const PagedKvLayer<T>& c, long head, int slot, const float* key, const float* value,
               int pos, int D, float theta, bool keep_last) {
  std::vector<float> rotated(D);
  rope_forward(rotated.data(), key, 1, 1, 1, D, pos, theta, keep_last);
  const long row = SlotRow(c, head, slot);
  for (int d = 0; d < D; ++d) {
    c.k_pool[row * D + d] = static_cast<T>(rotated[d]);
    c.v_pool[row * D + d] = static_cast<T>(value[d]);
  }
  if (c.slot_pos) c.slot_pos[row] = pos;
}

}  // namespace

template <typename T>
void paged_kv_append(const PagedKvLayer<T>& c, const T* k, const T* v, const float* merge,
                     const float* omega, const int32_t* positions, int n, int Hkv, int D,
                     float theta, bool keep_last_channel) {
  const int w = c.window_size;
  std::vector<float> key(D), value(D);
  for (int i = 0; i < n; ++i)
    for (int h = 0; h < Hkv; ++h) {
      const long head = static_cast<long>(i) * Hkv + h;
      const int pos = positions[i];
      const bool m = merge && c.lengths[head] > 0 && pos > 0 && merge[head] > 0.5f;
      if (!m) {
        ++c.lengths[head];
        if (w > 0) c.window_count[head] = 0;
      }
      const int slot = c.lengths[head] - 1;
      const T* kt = k + head * D;
      const T* vt = v + head * D;
      if (w > 0) {
        T* ring = c.window + head * w * 2 * D;
        float* ring_omega = c.window_omega + head * w;
        T* e = ring + (pos % w) * 2 * D;
        std::copy(kt, kt + D, e);
        std::copy(vt, vt + D, e + D);
        ring_omega[pos % w] = omega ? omega[head] : 1.0f;
        const int count = c.window_count[head] = std::min(c.window_count[head] + 1, w);
        double denom = 0;
        std::vector<double> ks(D, 0.0), vs(D, 0.0);
        for (int p = pos - count + 1; p <= pos; ++p) {
          const T* r = ring + (p % w) * 2 * D;
          const double om = ring_omega[p % w];
          denom += om;
          for (int d = 0; d < D; ++d) {
            ks[d] += om * static_cast<double>(r[d]);
            vs[d] += om * static_cast<double>(r[D + d]);
          }
        }
        for (int d = 0; d < D; ++d) {
          key[d] = static_cast<float>(ks[d] / denom);
          value[d] = static_cast<float>(vs[d] / denom);
        }
      } else {
        for (int d = 0; d < D; ++d) {
          key[d] = static_cast<float>(kt[d]);
          value[d] = static_cast<float>(vt[d]);
        }
      }
      StoreSlot(c, head, slot, key.data(), value.data(), pos, D, theta, keep_last_channel);
    }
}

template <typename T>
void paged_kv_prefill(const PagedKvLayer<T>& c, int row, const T* khat, const T* vhat, const T* k,
                      const T* v, const float* merge, const float* omega, int P, int Hkv, int D,
                      float theta, bool keep_last_channel) {
  const int w = c.window_size;
  std::vector<float> key(D), value(D);
  for (int h = 0; h < Hkv; ++h) {
    const long head = static_cast<long>(row) * Hkv + h;
    auto appends = [&](int t) { return t == 0 || !merge || merge[static_cast<long>(t) * Hkv + h] <= 0.5f; };
    int slots = 0, last_append = 0;
    for (int t = 0; t < P; ++t) {
      if (appends(t)) {
        ++slots;
        last_append = t;
      }
      if (t + 1 < P && !appends(t + 1)) continue;  // the slot is still open at t
      const long src = (static_cast<long>(t) * Hkv + h) * D;
      for (int d = 0; d < D; ++d) {
        key[d] = static_cast<float>(khat[src + d]);
        value[d] = static_cast<float>(vhat[src + d]);
      }
      StoreSlot(c, head, slots - 1, key.data(), value.data(), t, D, theta, keep_last_channel);
    }
    c.lengths[head] = slots;
    if (w == 0) continue;
    const int first = std::max(last_append, P - w);
    c.window_count[head] = P - first;
    for (int p = first; p < P; ++p) {
      T* e = c.window + (head * w + p % w) * 2 * D;
      const long src = (static_cast<long>(p) * Hkv + h) * D;
      std::copy(k + src, k + src + D, e);
      std::copy(v + src, v + src + D, e + D);
      c.window_omega[head * w + p % w] = omega ? omega[static_cast<long>(p) * Hkv + h] : 1.0f;
    }
  }
}

template <typename T>
void paged_kv_extend(const PagedKvLayer<T>& c, int row, const T* k, const T* v, const float* merge,
                     const float* omega, int start, int n, int Hkv, int D, float theta,
                     bool keep_last_channel, T* khat, T* vhat, int* prefix) {
  // The row alone, as a batch of one: each token one paged_kv_append.
  PagedKvLayer<T> r = c;
  const long head0 = static_cast<long>(row) * Hkv;
  r.page_table += head0 * c.max_pages;
  r.lengths += head0;
  if (c.window_size > 0) {
    r.window += head0 * c.window_size * 2 * D;
    r.window_omega += head0 * c.window_size;
    r.window_count += head0;
  }
  for (int h = 0; h < Hkv; ++h) {
    const bool merges = merge && r.lengths[h] > 0 && start > 0 && merge[h] > 0.5f;
    for (int t = 0; t < n; ++t) prefix[t * Hkv + h] = r.lengths[h] - (merges ? 1 : 0);
  }
  for (int t = 0; t < n; ++t) {
    const int32_t pos = start + t;
    const long at = static_cast<long>(t) * Hkv;
    paged_kv_append(r, k + at * D, v + at * D, merge ? merge + at : nullptr,
                    omega ? omega + at : nullptr, &pos, 1, Hkv, D, theta, keep_last_channel);
    for (int h = 0; h < Hkv; ++h) {
      const long slot = SlotRow(r, h, r.lengths[h] - 1);
      std::copy(c.k_pool + slot * D, c.k_pool + (slot + 1) * D, khat + (at + h) * D);
      std::copy(c.v_pool + slot * D, c.v_pool + (slot + 1) * D, vhat + (at + h) * D);
    }
  }
}

template void paged_kv_append<float>(const PagedKvLayer<float>&, const float*, const float*,
                                     const float*, const float*, const int32_t*, int, int, int,
                                     float, bool);
template void paged_kv_prefill<float>(const PagedKvLayer<float>&, int, const float*, const float*,
                                      const float*, const float*, const float*, const float*, int,
                                      int, int, float, bool);

template void paged_kv_extend<float>(const PagedKvLayer<float>&, int, const float*, const float*,
                                     const float*, const float*, int, int, int, int, float, bool,
                                     float*, float*, int*);

}  // namespace dmc::kernels
