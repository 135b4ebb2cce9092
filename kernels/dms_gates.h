// DMS eviction decisions (model/DMS.md §1–§3). One scalar per (b, t, KV head h) of x [B, T, Hkv],
// the decision channel: the query channel q[b, t, h·G, D-1] before RoPE, or the adapter's output
// Linear(RMSNorm(r_t)) (model/llama.h says which).
//   a      = scale · x - offset                          decision logit (s = 100, c = 5)
//   logit  = (a + noise) / temperature   (kRelaxed: noise logistic, tau = 0.1)
//          = a                           (kHard)
//   alpha  = sigmoid(logit)              (kRelaxed, soft: what the mask uses)
//          = 1[a > 0]                    (kHard)
//   evict  = 1[alpha >= 0.5] + alpha - sg(alpha)   straight-through hard decision, the input of
//            the compression loss (kHard: = alpha, gradient through sigmoid(a))
//   mask[j] = additive bias of KEY j from the NEXT token's decision:
//            logsigmoid(-logit[j+1]) = log(1 - alpha[j+1])   (kRelaxed)
//            -inf · alpha[j+1]                               (kHard: the key is gone)
//            0 for j = T-1 (alpha_0 marks nothing)
// dmc_attention adds mask[j] only where t - j > window (the delayed eviction of model/DMS.md §3).
//
// Backward (devict and dmask may be null; the hard mask is a constant):
//   dlogit[t] = devict[t] · s(1-s)  -  dmask[t-1] · alpha[t]        (t >= 1 for the mask term)
//     with s = alpha (kRelaxed) or sigmoid(a) (kHard, straight-through)
//   dx[t]    += dlogit[t] · scale / temperature  (kRelaxed),  dlogit[t] · scale  (kHard)
#pragma once

#include "kernels/dmc_gates.h"

namespace dmc::kernels {

struct DmsGateParams {
  float scale = 100.0f;
  float offset = 5.0f;
  float temperature = 0.1f;
  DmcDecisionMode mode = DmcDecisionMode::kRelaxed;
};

// logit, alpha, evict, mask [B, T, Hkv] (any may be null but logit and alpha, which the backward
// reads); noise is read only in kRelaxed mode.
template <typename T>
void dms_gates_forward(T* logit, T* alpha, T* evict, T* mask, const T* x, const T* noise, int B,
                       int T_, int Hkv, const DmsGateParams& params);

// dx = the decision input's gradient (accumulate: +=); devict and dmask may be null.
template <typename T>
void dms_gates_backward(T* dx, const T* devict, const T* dmask, const T* logit, const T* alpha,
                        int B, int T_, int Hkv, const DmsGateParams& params, bool accumulate);

}  // namespace dmc::kernels
