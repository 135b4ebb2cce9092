// Grouped-query attention under the LoMA block mask (kernels/loma_mask.h), the mask evaluated on
// the fly from the zone layout (t, c) instead of read from a dense T×T tensor.
// q [B, T, H, D]; k, v [B, T, Hkv, D]; query head g reads KV head g / (H / Hkv).
//   s[t, i] = scale · q[t]·k[i]  for the keys i with loma_allowed(t, i, z)   (others: -inf)
//   out[t]  = sum_i softmax_i(s[t, :]) v[i],   lse [B, H, T] = logsumexp_i s[t, i]
// Every query sees at least itself, so every row has a finite lse.
#pragma once

#include "kernels/loma_mask.h"

namespace dmc::kernels {

template <typename T>
void loma_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, int B, int T_,
                            int H, int Hkv, int D, const LomaZones& z, float scale);

// Writes (accumulate false) or accumulates (+=, true) dq, dk, dv from dout and the forward's out
// and lse; any of them may be null.
template <typename T>
void loma_attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k,
                             const T* v, const T* out, const T* lse, int B, int T_, int H, int Hkv,
                             int D, const LomaZones& z, float scale, bool accumulate);

}  // namespace dmc::kernels
