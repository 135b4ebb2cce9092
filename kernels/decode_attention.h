// Attention of ONE new token per sequence over a paged KV cache whose heads hold different numbers
// of slots (model/DMC.md §6): DMC merges, and the eviction baselines drop, per head. Every slot is
// visible: merged-forward states no longer exist in the cache, which is what the training-time
// mask emulates.
//
// Layout (the block-table form of paged attention, so the CUDA kernel reads the same arrays):
//   q, out       [B, H, D]
//   k_pool       [pages, page_size, D] rotated keys; v_pool the same for values
//   lengths      [B, Hkv] slots of each (sequence, KV head)
//   page_table   [B, Hkv, max_pages]: slot i of head (b, h) is row i % page_size of page
//                page_table[(b·Hkv + h)·max_pages + i / page_size]
// Query head g of a sequence reads KV head g / (H / Hkv) (GQA, HF repeat_kv):
//   out[b, g] = sum_i softmax_i(scale · q[b, g] · k_i) v_i   (channel D-1 excluded from the dot
//   product when exclude_ctrl: it is DMC's control channel)
// probs, when not null, receives the attention weights: probs[(b·H + g)·probs_stride + i] for
// i < lengths[b, g / G]; the eviction baselines score tokens with them.
#pragma once

#include <cstdint>

namespace dmc::kernels {

template <typename T>
void paged_decode_attention(T* out, T* probs, int probs_stride, const T* q, const T* k_pool,
                            const T* v_pool, const int32_t* page_table, const int* lengths,
                            int max_pages, int page_size, int B, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale);

}  // namespace dmc::kernels
