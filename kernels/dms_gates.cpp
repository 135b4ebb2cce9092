// DMS eviction decisions (spec: kernels/dms_gates.h, model/DMS.md §1–§3). Elementwise except the
// mask,
// which reads the next position's logit: the key of token j is evicted by the decision of j+1.
#include "kernels/dms_gates.h"

#include <cmath>
#include <limits>

namespace dmc::kernels {
namespace {

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// log(sigmoid(x)) without overflow for large |x|.
inline double logsigmoid(double x) {
  return std::fmin(x, 0.0) - std::log1p(std::exp(-std::fabs(x)));
}

template <typename T>
double decision_logit(const T* x, const T* noise, long i, const DmsGateParams& p) {
  const double a = p.scale * static_cast<double>(x[i]) - p.offset;
  if (p.mode == DmcDecisionMode::kHard) return a;
  return (a + static_cast<double>(noise[i])) / p.temperature;
}

}  // namespace

template <typename T>
void dms_gates_forward(T* logit, T* alpha, T* evict, T* mask, const T* x, const T* noise, int B,
                       int T_, int Hkv, const DmsGateParams& params) {
  const bool relaxed = params.mode == DmcDecisionMode::kRelaxed;
  const long row = Hkv;  // one position's decisions
  for (long i = 0; i < static_cast<long>(B) * T_ * Hkv; ++i) {
    const double l = decision_logit(x, noise, i, params);
    const double a = relaxed ? sigmoid(l) : (l > 0 ? 1.0 : 0.0);
    logit[i] = static_cast<T>(l);
    alpha[i] = static_cast<T>(a);
    if (evict) evict[i] = static_cast<T>(a >= 0.5 ? 1.0 : 0.0);
    if (mask) {
      const int t = static_cast<int>((i / row) % T_);
      double m = 0;  // the last key has no next token
      if (t + 1 < T_) {
        const double next = decision_logit(x, noise, i + row, params);
        m = relaxed ? logsigmoid(-next)
                    : (next > 0 ? -std::numeric_limits<double>::infinity() : 0.0);
      }
      mask[i] = static_cast<T>(m);
    }
  }
}

template <typename T>
void dms_gates_backward(T* dx, const T* devict, const T* dmask, const T* logit, const T* alpha,
                        int B, int T_, int Hkv, const DmsGateParams& params, bool accumulate) {
  const bool relaxed = params.mode == DmcDecisionMode::kRelaxed;
  const long row = Hkv;
  const double dlogit_dx = relaxed ? params.scale / params.temperature : params.scale;
  for (long i = 0; i < static_cast<long>(B) * T_ * Hkv; ++i) {
    const int t = static_cast<int>((i / row) % T_);
    const double s = relaxed ? static_cast<double>(alpha[i]) : sigmoid(logit[i]);
    double dlogit = devict ? devict[i] * s * (1.0 - s) : 0.0;
    // mask[t-1] = logsigmoid(-logit[t]):  d/dlogit[t] = -sigmoid(logit[t]) = -alpha[t]
    if (dmask && relaxed && t >= 1) dlogit -= dmask[i - row] * static_cast<double>(alpha[i]);
    const T g = static_cast<T>(dlogit * dlogit_dx);
    dx[i] = accumulate ? dx[i] + g : g;
  }
}

template void dms_gates_forward<float>(float*, float*, float*, float*, const float*, const float*,
                                       int, int, int, const DmsGateParams&);
template void dms_gates_forward<double>(double*, double*, double*, double*, const double*,
                                        const double*, int, int, int, const DmsGateParams&);
template void dms_gates_backward<float>(float*, const float*, const float*, const float*,
                                        const float*, int, int, int, const DmsGateParams&, bool);
template void dms_gates_backward<double>(double*, const double*, const double*, const double*,
                                         const double*, int, int, int, const DmsGateParams&,
                                         bool);

}  // namespace dmc::kernels
