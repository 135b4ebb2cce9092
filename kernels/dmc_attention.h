// Causal grouped-query attention over DMC-accumulated keys/values with the additive DMC mask.
// q [B, T, H, D]; k, v [B, T, Hkv, D]; query head g reads KV head g / (H / Hkv).
//   s[t, i] = scale · sum_{c < Dqk} q[t, c] k[i, c]  +  (t - i > w ? mask[b, i, h_kv] : 0),  i <= t
//   out[t]  = sum_i softmax_i(s[t, :]) v[i]
// w = mask_window. DMC (w = 0): the diagonal (i = t) is exempt from the mask (model/DMC.md §3).
// DMS (w > 0, model/DMS.md §3): the band t - i <= w is exempt, so a key marked for eviction stays
// visible to itself and the next w queries (delayed eviction); m = -inf is the hard form.
// Dqk = D - 1 when exclude_ctrl (the DMC control channel carries no content), D otherwise.
// mask [B, T, Hkv] may be null (vanilla).
// lse [B, H, T] = logsumexp_i s[t, i] is saved for the backward pass, as FlashAttention does.
#pragma once

namespace dmc::kernels {

template <typename T>
void dmc_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const T* mask,
                           int B, int T_, int H, int Hkv, int D, bool exclude_ctrl, float scale,
                           int mask_window = 0);

// Writes (accumulate false) or accumulates (true) dq, dk, dv and dmask (dmask[b, i, h_kv] = the
// sum over queries t > i + w and the G query heads of the group of dS[t, i]); any may be null.
// With exclude_ctrl, dq's and dk's channel D-1 get no gradient (written 0, or left as they are).
template <typename T>
void dmc_attention_backward(T* dq, T* dk, T* dv, T* dmask, const T* dout, const T* q, const T* k,
                            const T* v, const T* mask, const T* out, const T* lse, int B, int T_,
                            int H, int Hkv, int D, bool exclude_ctrl, float scale, bool accumulate,
                            int mask_window = 0);

}  // namespace dmc::kernels
