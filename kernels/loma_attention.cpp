// LoMA attention, CPU reference (spec: kernels/loma_attention.h). The FlashAttention formulation
// of kernels/dmc_attention.cpp with a different mask: instead of "i ≤ t plus an additive bias",
// the keys of query t are those with loma_allowed(t, i, z), found tile by tile — key tiles that
// loma_tile_active rules out are skipped whole, so the work per query is its allowed keys (the
// earlier memory zones plus one range) rather than all of i ≤ t. The CUDA kernel walks the same
// key lists (kernels/loma_attention.cu); the results do not depend on the tiling.
//
// Backward: p[i] = exp(s[i] - lse[t]), dp[i] = dout[t]·v[i], Delta = dout[t]·out[t],
// dS[i] = p[i] (dp[i] - Delta); dv[i] += p[i] dout[t], dq[t] += scale sum_i dS[i] k[i],
// dk[i] += scale dS[i] q[t]. Disallowed keys have p = 0 and get nothing.
//
// Work is split over (b, query head) in the forward and (b, KV head) in the backward under
// OpenMP: the outputs written by different iterations are disjoint.
#include "kernels/loma_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmc::kernels {
namespace {

// Key tile of the on-the-fly mask: keys are tested for loma_tile_active this many at a time.
constexpr int kKeyTile = 16;

template <typename T>
double dot(const T* a, const T* b, int n) {
  double s = 0;
  for (int c = 0; c < n; ++c) s += static_cast<double>(a[c]) * b[c];
  return s;
}

struct Layout {
  int T_, H, Hkv, D;
  long q(int b, int t, int g) const { return ((static_cast<long>(b) * T_ + t) * H + g) * D; }
  long kv(int b, int i, int h) const { return ((static_cast<long>(b) * T_ + i) * Hkv + h) * D; }
  long lse(int b, int g, int t) const { return (static_cast<long>(b) * H + g) * T_ + t; }
};

// The keys query t may attend to, in increasing order.
void allowed_keys(std::vector<int>& keys, int t, const LomaZones& z) {
  keys.clear();
  for (int k0 = 0; k0 <= t; k0 += kKeyTile) {
    const int k1 = std::min(k0 + kKeyTile, t + 1);
    if (!loma_tile_active(t, t + 1, k0, k1, z)) continue;
    for (int i = k0; i < k1; ++i)
      if (loma_allowed(t, i, z)) keys.push_back(i);
  }
}

// Scores s[n] = scale · q[t]·k[keys[n]] of query (b, t, g) against KV head h.
template <typename T>
void scores(std::vector<double>& s, const std::vector<int>& keys, const T* q, const T* k,
            const Layout& L, int b, int t, int g, int h, double scale) {
  s.resize(keys.size());
  const T* qt = q + L.q(b, t, g);
  for (size_t n = 0; n < keys.size(); ++n) s[n] = scale * dot(qt, k + L.kv(b, keys[n], h), L.D);
}

bool worth_threads(int B, int H, int T_, int D) {
  return static_cast<long>(B) * H * T_ * T_ * D >= (1L << 18);
}

}  // namespace

template <typename T>
void loma_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, int B, int T_,
                            int H, int Hkv, int D, const LomaZones& z, float scale) {
  const Layout L{T_, H, Hkv, D};
  const int G = H / Hkv;
  const bool parallel = worth_threads(B, H, T_, D);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int bg = 0; bg < B * H; ++bg) {
    const int b = bg / H, g = bg % H, h = g / G;
    std::vector<int> keys;
    std::vector<double> s, acc(D);
    for (int t = 0; t < T_; ++t) {
      allowed_keys(keys, t, z);
      scores(s, keys, q, k, L, b, t, g, h, scale);
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t n = 0; n < keys.size(); ++n) {
        const T* vi = v + L.kv(b, keys[n], h);
        const double p = s[n] / sum;
        for (int c = 0; c < D; ++c) acc[c] += p * vi[c];
      }
      T* o = out + L.q(b, t, g);
      for (int c = 0; c < D; ++c) o[c] = static_cast<T>(acc[c]);
      if (lse) lse[L.lse(b, g, t)] = static_cast<T>(mx + std::log(sum));
    }
  }
}

template <typename T>
void loma_attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k,
                             const T* v, const T* out, const T* lse, int B, int T_, int H, int Hkv,
                             int D, const LomaZones& z, float scale, bool accumulate) {
  const Layout L{T_, H, Hkv, D};
  const int G = H / Hkv;
  const double sc = scale;
  auto put = [accumulate](T* out, long i, double g) {  // out[i] = g, or += g
    out[i] = accumulate ? out[i] + static_cast<T>(g) : static_cast<T>(g);
  };
  const bool parallel = worth_threads(B, H, T_, D);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int bh = 0; bh < B * Hkv; ++bh) {
    const int b = bh / Hkv, h = bh % Hkv;
    // double accumulators for this KV head's gradients, summed over its G query heads
    std::vector<int> keys;
    std::vector<double> s, dq_t(D), dk_h(static_cast<size_t>(T_) * D),
        dv_h(static_cast<size_t>(T_) * D);
    for (int g = h * G; g < (h + 1) * G; ++g)
      for (int t = 0; t < T_; ++t) {
        allowed_keys(keys, t, z);
        scores(s, keys, q, k, L, b, t, g, h, sc);
        const T* do_t = dout + L.q(b, t, g);
        const T* q_t = q + L.q(b, t, g);
        const double l = lse[L.lse(b, g, t)];
        const double delta = dot(do_t, out + L.q(b, t, g), D);
        std::fill(dq_t.begin(), dq_t.end(), 0.0);
        for (size_t n = 0; n < keys.size(); ++n) {
          const int i = keys[n];
          const T* k_i = k + L.kv(b, i, h);
          const double p = std::exp(s[n] - l);
          const double dS = p * (dot(do_t, v + L.kv(b, i, h), D) - delta);
          double* dk_i = dk_h.data() + static_cast<size_t>(i) * D;
          double* dv_i = dv_h.data() + static_cast<size_t>(i) * D;
          for (int c = 0; c < D; ++c) {
            dv_i[c] += p * do_t[c];
            dk_i[c] += dS * q_t[c];
            dq_t[c] += dS * k_i[c];
          }
        }
        if (dq)
          for (int c = 0; c < D; ++c) put(dq, L.q(b, t, g) + c, sc * dq_t[c]);
      }
    for (int i = 0; i < T_; ++i)
      for (int c = 0; c < D; ++c) {
        if (dk) put(dk, L.kv(b, i, h) + c, sc * dk_h[static_cast<size_t>(i) * D + c]);
        if (dv) put(dv, L.kv(b, i, h) + c, dv_h[static_cast<size_t>(i) * D + c]);
      }
  }
}

template void loma_attention_forward<float>(float*, float*, const float*, const float*,
                                            const float*, int, int, int, int, int,
                                            const LomaZones&, float);
template void loma_attention_forward<double>(double*, double*, const double*, const double*,
                                             const double*, int, int, int, int, int,
                                             const LomaZones&, float);
template void loma_attention_backward<float>(float*, float*, float*, const float*, const float*,
                                             const float*, const float*, const float*,
                                             const float*, int, int, int, int, int,
                                             const LomaZones&, float, bool);
template void loma_attention_backward<double>(double*, double*, double*, const double*,
                                              const double*, const double*, const double*,
                                              const double*, const double*, int, int, int, int,
                                              int, const LomaZones&, float, bool);

}  // namespace dmc::kernels
