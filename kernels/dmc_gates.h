// DMC decisions and importances from the repurposed control channel (model/DMC.md §1, §3).
//
// For every (b, t, KV head h) of q [B, T, H, D] and k [B, T, Hkv, D], read BEFORE RoPE:
//   a      = k[b,t,h,D-1] - init_val                       decision logit, starts near -5
//   logit  = (a + noise[b,t,h]) / temperature   (kRelaxed: noise = g1 - g2, logistic)
//          = a                                  (kHard)
//   alpha  = sigmoid(logit)                     (kRelaxed, soft: never rounded in the forward)
//          = 1[a > 0]                           (kHard)
//   merge  = round(sigmoid(logit))  (kRelaxed) / 1[a > 0] (kHard)  -- hard decision, CR loss input
//   omega  = sigmoid(mean_{g in group h} q[b,t,g,D-1] + init_val) + omega_eps   importance
//   mask   = additive attention bias for KEY t, taken from the NEXT token's decision:
//            log(1 - alpha[t+1]) = logsigmoid(-logit[t+1]) (kRelaxed),  -50000 · alpha[t+1] (kHard),
//            and 0 for t = T-1.
// The query heads of KV head h are the contiguous block [h·G, (h+1)·G), G = H / Hkv (HF repeat_kv).
//
// Gradients (backward):
//   kRelaxed: d alpha/d logit = alpha(1-alpha); merge is straight-through through sigmoid(logit),
//             so d merge/d logit = alpha(1-alpha); d mask[t]/d logit[t+1] = -alpha[t+1];
//             d logit / d k[D-1] = 1/temperature.
//   kHard:    straight-through: alpha and merge get sigmoid'(a); the -50000 mask is a constant.
//   omega:    d omega / d q[g, D-1] = sigmoid'(s) / G.
#pragma once

namespace dmc::kernels {

enum class DmcDecisionMode { kRelaxed, kHard };

struct DmcGateParams {
  float init_val = 5.0f;
  float temperature = 0.1f;
  float omega_eps = 0.0078125f;  // bf16 machine epsilon, as the reference adds
  DmcDecisionMode mode = DmcDecisionMode::kRelaxed;
};

// All arrays are [B, T, Hkv]. noise is read only in kRelaxed mode.
template <typename T>
struct DmcGateTensors {
  T* logit = nullptr;
  T* alpha = nullptr;
  T* merge = nullptr;
  T* mask = nullptr;
  T* omega = nullptr;
};

template <typename T>
void dmc_gates_forward(const DmcGateTensors<T>& out, const T* q, const T* k, const T* noise,
                       int B, int T_, int H, int Hkv, int D, const DmcGateParams& params);

// Accumulates into dq[..., D-1] and dk[..., D-1]. Any of dalpha, dmerge, dmask, domega may be null.
template <typename T>
void dmc_gates_backward(T* dq, T* dk, const T* dalpha, const T* dmerge, const T* dmask,
                        const T* domega, const T* q, const T* logit, const T* alpha, int B, int T_,
                        int H, int Hkv, int D, const DmcGateParams& params);

}  // namespace dmc::kernels
