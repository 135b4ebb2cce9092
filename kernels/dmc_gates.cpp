// DMC decisions and importances from the repurposed control channel (spec: kernels/dmc_gates.h,
// model/DMC.md §1, §3). One scalar per (b, t, KV head h), from channel D-1 of k and q before RoPE:
//
//   a     = k[b,t,h,D-1] - init_val
//   logit = (a + noise) / temperature      relaxed (training): Gumbel-sigmoid relaxation
//         = a                              hard (evaluation)
//   alpha = sigmoid(logit)                 relaxed: soft decision, never rounded in the forward
//         = 1[a > 0]                       hard
//   merge = 1[sigmoid(logit) >= 0.5]       the hard decision the CR loss counts (relaxed); = alpha
//                                          (hard). Ties (logit exactly 0) round up, as
//                                          std::round and the CUDA kernel do.
//   omega = sigmoid(mean_g q[b,t,g,D-1] + init_val) + omega_eps, g over the G = H/Hkv query
//           heads [h·G, (h+1)·G) of KV head h
//   mask[t] = log(1 - alpha[t+1]) = logsigmoid(-logit[t+1])   relaxed
//           = -50000 · alpha[t+1]                              hard
//           = 0 for t = T-1
//
// Why the mask of key t comes from the decision at t+1: if token t+1 merges into t's slot, the
// partially accumulated state at t no longer exists at inference time, so later queries must not
// see it; log(1 - alpha) is the soft version of "hide it".
//
// Backward: every output is a function of logit[t] (or of logit[t+1] for mask[t]) and of the
// group's q control channels, so the chain rule ends in dk[..., D-1] and dq[..., D-1]:
//   dlogit[t] = (dalpha[t] + dmerge[t]) · s(1-s)  +  dmask[t-1] · (-alpha[t])  (relaxed, t >= 1)
//     with s = alpha (relaxed) or sigmoid(a) (hard: straight-through, the forward step function
//     is replaced by sigmoid in the backward); merge is straight-through in both modes; the hard
//     mask is a constant.
//   dk[t, D-1] += dlogit[t] / temperature (relaxed) or dlogit[t] (hard)
//   dq[t, g, D-1] += domega[t] · sigmoid'(mean_q + init_val) / G   for each g of the group
#include "kernels/dmc_gates.h"

#include <cmath>

namespace dmc::kernels {
namespace {

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// log(sigmoid(x)) without overflow for large |x|.
inline double logsigmoid(double x) {
  return std::fmin(x, 0.0) - std::log1p(std::exp(-std::fabs(x)));
}

inline long idx3(int b, int t, int h, int T_, int Hkv) {
  return (static_cast<long>(b) * T_ + t) * Hkv + h;
}

template <typename T>
double decision_logit(const T* k, const T* noise, long i, int D, const DmcGateParams& p) {
  const double a = static_cast<double>(k[i * D + D - 1]) - p.init_val;
  if (p.mode == DmcDecisionMode::kHard) return a;
  return (a + static_cast<double>(noise[i])) / p.temperature;
}

// mean over the query heads of KV head h of q[b, t, g, D-1]
template <typename T>
double group_mean_q(const T* q, int b, int t, int h, int T_, int H, int Hkv, int D) {
  const int G = H / Hkv;
  double s = 0;
  for (int g = h * G; g < (h + 1) * G; ++g)
    s += q[((static_cast<long>(b) * T_ + t) * H + g) * D + D - 1];
  return s / G;
}

}  // namespace

template <typename T>
void dmc_gates_forward(const DmcGateTensors<T>& out, const T* q, const T* k, const T* noise, int B,
                       int T_, int H, int Hkv, int D, const DmcGateParams& params) {
  const bool relaxed = params.mode == DmcDecisionMode::kRelaxed;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t)
      for (int h = 0; h < Hkv; ++h) {
        const long i = idx3(b, t, h, T_, Hkv);
        const double logit = decision_logit(k, noise, i, D, params);
        const double alpha = relaxed ? sigmoid(logit) : (logit > 0 ? 1.0 : 0.0);
        if (out.logit) out.logit[i] = static_cast<T>(logit);
        if (out.alpha) out.alpha[i] = static_cast<T>(alpha);
        if (out.merge) out.merge[i] = static_cast<T>(alpha >= 0.5 ? 1.0 : 0.0);
        if (out.omega) {
          const double s = group_mean_q(q, b, t, h, T_, H, Hkv, D) + params.init_val;
          out.omega[i] = static_cast<T>(sigmoid(s) + params.omega_eps);
        }
        if (out.mask) {
          double m = 0;  // the last key has no next token
          if (t + 1 < T_) {
            const double next = decision_logit(k, noise, idx3(b, t + 1, h, T_, Hkv), D, params);
            m = relaxed ? logsigmoid(-next) : -50000.0 * (next > 0 ? 1.0 : 0.0);
          }
          out.mask[i] = static_cast<T>(m);
        }
      }
}

template <typename T>
void dmc_gates_backward(T* dq, T* dk, const T* dalpha, const T* dmerge, const T* dmask,
                        const T* domega, const T* q, const T* logit, const T* alpha, int B, int T_,
                        int H, int Hkv, int D, const DmcGateParams& params) {
  const bool relaxed = params.mode == DmcDecisionMode::kRelaxed;
  const int G = H / Hkv;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t)
      for (int h = 0; h < Hkv; ++h) {
        const long i = idx3(b, t, h, T_, Hkv);
        if (dk) {
          // slope of the (straight-through) sigmoid at this token's logit
          const double s = relaxed ? static_cast<double>(alpha[i]) : sigmoid(logit[i]);
          const double slope = s * (1.0 - s);
          double dlogit = 0;
          if (dalpha) dlogit += dalpha[i] * slope;
          if (dmerge) dlogit += dmerge[i] * slope;
          // mask[t-1] = logsigmoid(-logit[t]):  d/dlogit[t] = -sigmoid(logit[t]) = -alpha[t]
          if (dmask && relaxed && t >= 1)
            dlogit -= dmask[idx3(b, t - 1, h, T_, Hkv)] * static_cast<double>(alpha[i]);
          const double dkv = relaxed ? dlogit / params.temperature : dlogit;
          dk[i * D + D - 1] += static_cast<T>(dkv);
        }
        if (dq && domega) {
          const double s = sigmoid(group_mean_q(q, b, t, h, T_, H, Hkv, D) + params.init_val);
          const double dq_each = domega[i] * s * (1.0 - s) / G;
          for (int g = h * G; g < (h + 1) * G; ++g)
            dq[((static_cast<long>(b) * T_ + t) * H + g) * D + D - 1] += static_cast<T>(dq_each);
        }
      }
}

template void dmc_gates_forward<float>(const DmcGateTensors<float>&, const float*, const float*,
                                       const float*, int, int, int, int, int, const DmcGateParams&);
template void dmc_gates_forward<double>(const DmcGateTensors<double>&, const double*, const double*,
                                        const double*, int, int, int, int, int,
                                        const DmcGateParams&);
template void dmc_gates_backward<float>(float*, float*, const float*, const float*, const float*,
                                        const float*, const float*, const float*, const float*, int,
                                        int, int, int, int, const DmcGateParams&);
template void dmc_gates_backward<double>(double*, double*, const double*, const double*,
                                         const double*, const double*, const double*, const double*,
                                         const double*, int, int, int, int, int,
                                         const DmcGateParams&);

}  // namespace dmc::kernels
