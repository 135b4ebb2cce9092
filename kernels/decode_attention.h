// Attention of ONE new token over a DMC KV cache whose heads hold different numbers of slots
// (spec §6). Every slot is visible: merged-forward states no longer exist in the cache, which is
// what the training-time mask emulates. q [H, D]; for KV head h, keys[h] and values[h] point to
// lengths[h] rows of D (already rotated keys). Query head g reads KV head g / (H / Hkv).
//   out[g] = sum_i softmax_i(scale · q[g] · keys[h][i]) values[h][i]   (channel D-1 excluded
//   from the dot product when exclude_ctrl)
// probs, when not null, receives the attention weights of query head g over the slots of its KV
// head, concatenated over g ([H][lengths[g/G]]): the eviction baselines score tokens with them.
#pragma once

namespace dmc::kernels {

template <typename T>
void decode_attention(T* out, T* probs, const T* q, const T* const* keys, const T* const* values,
                      const int* lengths, int H, int Hkv, int D, bool exclude_ctrl, float scale);

}  // namespace dmc::kernels
