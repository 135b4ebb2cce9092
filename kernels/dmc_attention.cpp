// Causal grouped-query attention with the additive DMC mask (spec: kernels/dmc_attention.h,
// model/DMC.md §3). For sequence b, query head g (KV head h = g / G, G = H / Hkv) and query t:
//   s[i] = scale · sum_{c < Dqk} q[t, c] k[i, c]  +  (t - i > w ? mask[i] : 0)      for i <= t
//   p    = softmax(s),   out[t] = sum_i p[i] v[i],   lse[t] = log sum_i exp(s[i])
// Dqk = D-1 with exclude_ctrl: channel D-1 of q and k is the DMC control channel and carries no
// content. The diagonal is exempt from the mask: the newest (partially accumulated) state is
// always visible to its own query, only older states that were merged forward are hidden (w = 0).
// DMS widens the exempt diagonal to the band t - i <= w (delayed eviction, model/DMS.md §3); a hard
// mask of -inf then removes the key from the softmax entirely.
//
// Backward (the FlashAttention formulation): the probabilities are recomputed from the saved lse,
// p[i] = exp(s[i] - lse[t]), and with dp[i] = dout[t]·v[i] and Delta = dout[t]·out[t]
// (= sum_i p[i] dp[i]) the softmax backward is dS[i] = p[i] · (dp[i] - Delta). Then
//   dv[i] += p[i] dout[t],   dq[t] += scale sum_i dS[i] k[i],   dk[i] += scale dS[i] q[t]
// (channels c < Dqk only: the control channel gets no attention gradient under exclude_ctrl), and
// since the mask enters s additively, dmask[i] += dS[i] for t - i > w, summed over queries and over
// the G query heads sharing the KV head.
//
// This is the plain O(T^2) reference with a full score row per query. Work is split over (b, KV
// head) under OpenMP: the outputs of different KV heads (and of their query heads) are disjoint.
#include "kernels/dmc_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmc::kernels {
namespace {

// Dot product with 4 independent partial sums (lets the compiler vectorise without reordering
// a single sum; the order is fixed, so the result is deterministic).
template <typename T>
inline double dot(const T* a, const T* b, int n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int c = 0;
  for (; c + 4 <= n; c += 4) {
    s0 += static_cast<double>(a[c]) * b[c];
    s1 += static_cast<double>(a[c + 1]) * b[c + 1];
    s2 += static_cast<double>(a[c + 2]) * b[c + 2];
    s3 += static_cast<double>(a[c + 3]) * b[c + 3];
  }
  for (; c < n; ++c) s0 += static_cast<double>(a[c]) * b[c];
  return (s0 + s1) + (s2 + s3);
}

struct Layout {
  int T_, H, Hkv, D;
  long q(int b, int t, int g) const { return ((static_cast<long>(b) * T_ + t) * H + g) * D; }
  long kv(int b, int i, int h) const { return ((static_cast<long>(b) * T_ + i) * Hkv + h) * D; }
  long mask(int b, int i, int h) const { return (static_cast<long>(b) * T_ + i) * Hkv + h; }
  long lse(int b, int g, int t) const { return (static_cast<long>(b) * H + g) * T_ + t; }
};

// Scores s[0..t] of query (b, t, g) against KV head h.
template <typename T>
void scores(double* s, const T* q, const T* k, const T* mask, const Layout& L, int b, int t, int g,
            int h, int Dqk, double scale, int window) {
  const T* qt = q + L.q(b, t, g);
  for (int i = 0; i <= t; ++i) {
    s[i] = scale * dot(qt, k + L.kv(b, i, h), Dqk);
    if (mask && t - i > window) s[i] += mask[L.mask(b, i, h)];
  }
}

}  // namespace

template <typename T>
void dmc_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const T* mask, int B,
                           int T_, int H, int Hkv, int D, bool exclude_ctrl, float scale,
                           int mask_window) {
  const Layout L{T_, H, Hkv, D};
  const int G = H / Hkv;
  const int Dqk = exclude_ctrl ? D - 1 : D;
  const int BH = B * H;
  // one thread below this much work: thread start-up would dominate
  const bool parallel = static_cast<long>(BH) * T_ * T_ * D >= (1L << 18);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int bg = 0; bg < BH; ++bg) {
    const int b = bg / H, g = bg % H, h = g / G;
    std::vector<double> s(T_), acc(D);
    for (int t = 0; t < T_; ++t) {
      scores(s.data(), q, k, mask, L, b, t, g, h, Dqk, scale, mask_window);
      double mx = -std::numeric_limits<double>::infinity();
      for (int i = 0; i <= t; ++i) mx = std::max(mx, s[i]);
      double sum = 0;
      for (int i = 0; i <= t; ++i) sum += (s[i] = std::exp(s[i] - mx));
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int i = 0; i <= t; ++i) {
        const T* vi = v + L.kv(b, i, h);
        const double p = s[i] / sum;
        for (int c = 0; c < D; ++c) acc[c] += p * vi[c];
      }
      T* o = out + L.q(b, t, g);
      for (int c = 0; c < D; ++c) o[c] = static_cast<T>(acc[c]);
      if (lse) lse[L.lse(b, g, t)] = static_cast<T>(mx + std::log(sum));
    }
  }
}

template <typename T>
void dmc_attention_backward(T* dq, T* dk, T* dv, T* dmask, const T* dout, const T* q, const T* k,
                            const T* v, const T* mask, const T* out, const T* lse, int B, int T_,
                            int H, int Hkv, int D, bool exclude_ctrl, float scale,
                            bool accumulate, int mask_window) {
  const Layout L{T_, H, Hkv, D};
  const int G = H / Hkv;
  const int Dqk = exclude_ctrl ? D - 1 : D;
  const int BH = B * Hkv;
  const double sc = scale;
  // out[i] = g, or += g; channel D-1 of dq/dk (Dqk = D - 1) receives g = 0
  auto put = [accumulate](T* out, long i, double g) {
    out[i] = accumulate ? out[i] + static_cast<T>(g) : static_cast<T>(g);
  };
  // one thread below this much work: thread start-up would dominate
  const bool parallel = static_cast<long>(B) * H * T_ * T_ * D >= (1L << 18);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int bh = 0; bh < BH; ++bh) {
    const int b = bh / Hkv, h = bh % Hkv;
    // double accumulators for this KV head's gradients, summed over its G query heads
    std::vector<double> s(T_), dq_t(D), dk_h(static_cast<size_t>(T_) * D),
        dv_h(static_cast<size_t>(T_) * D), dmask_h(T_);
    for (int g = h * G; g < (h + 1) * G; ++g)
      for (int t = 0; t < T_; ++t) {
        scores(s.data(), q, k, mask, L, b, t, g, h, Dqk, sc, mask_window);
        const T* do_t = dout + L.q(b, t, g);
        const T* q_t = q + L.q(b, t, g);
        const double l = lse[L.lse(b, g, t)];
        const double delta = dot(do_t, out + L.q(b, t, g), D);
        std::fill(dq_t.begin(), dq_t.end(), 0.0);
        for (int i = 0; i <= t; ++i) {
          const T* k_i = k + L.kv(b, i, h);
          const T* v_i = v + L.kv(b, i, h);
          const double p = std::exp(s[i] - l);
          const double dS = p * (dot(do_t, v_i, D) - delta);
          double* dk_i = dk_h.data() + static_cast<size_t>(i) * D;
          double* dv_i = dv_h.data() + static_cast<size_t>(i) * D;
          for (int c = 0; c < D; ++c) dv_i[c] += p * do_t[c];
          for (int c = 0; c < Dqk; ++c) dk_i[c] += dS * q_t[c];
          for (int c = 0; c < Dqk; ++c) dq_t[c] += dS * k_i[c];
          if (t - i > mask_window) dmask_h[i] += dS;
        }
        if (dq)
          for (int c = 0; c < D; ++c) put(dq, L.q(b, t, g) + c, sc * dq_t[c]);
      }
    for (int i = 0; i < T_; ++i) {
      const double* dk_i = dk_h.data() + static_cast<size_t>(i) * D;
      const double* dv_i = dv_h.data() + static_cast<size_t>(i) * D;
      if (dk)
        for (int c = 0; c < D; ++c) put(dk, L.kv(b, i, h) + c, sc * dk_i[c]);
      if (dv)
        for (int c = 0; c < D; ++c) put(dv, L.kv(b, i, h) + c, dv_i[c]);
      if (dmask) put(dmask, L.mask(b, i, h), dmask_h[i]);
    }
  }
}

template void dmc_attention_forward<float>(float*, float*, const float*, const float*, const float*,
                                           const float*, int, int, int, int, int, bool, float, int);
template void dmc_attention_forward<double>(double*, double*, const double*, const double*,
                                            const double*, const double*, int, int, int, int, int,
                                            bool, float, int);
template void dmc_attention_backward<float>(float*, float*, float*, float*, const float*,
                                            const float*, const float*, const float*, const float*,
                                            const float*, const float*, int, int, int, int, int,
                                            bool, float, bool, int);
template void dmc_attention_backward<double>(double*, double*, double*, double*, const double*,
                                             const double*, const double*, const double*,
                                             const double*, const double*, const double*, int, int,
                                             int, int, int, bool, float, bool, int);

}  // namespace dmc::kernels
