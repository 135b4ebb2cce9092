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
//
// paged_decode_attention_quantized: the same attention over a quantized cache (kernels/kv_quant.h):
// head (b, h) holds q_lengths[b, h] slots in quantized pages (full, but for per-token keys the
// last one, which fills a row at a time; slot i: row i % page_size of
// page page_table[(b·Hkv + h)·max_pages + i / page_size] of `pages`, each layout.bytes long), then
// r_lengths[b, h] slots at full precision in its residual block: slot q_lengths + j is row j of
// block residual_block[b, h] of r_k_pool / r_v_pool [blocks, residual_slots, D]. Quantized rows
// are dequantized as they are read, one KV head at a time; probs index slots in that order.
//
// paged_decode_attention_think: the same over a ThinK cache (kernels/think_channels.h): head
// (b, h) holds p_lengths[b, h] slots in pruned pages (slot i: row i % page_size of page
// p = page_table[(b·Hkv + h)·max_pages + i / page_size]; its key, the `kept` channels of mask
// p, is row i % page_size of k_pages [pages, page_size, kept], its value the same row of
// v_pages [pages, page_size, D], its mask masks[p · ceil(D / 8) ...]), then r_lengths[b, h]
// whole rows in its residual block, as above. A pruned slot's score is the dot product over its
// kept channels only: scale · Σ_{j kept} q[j] · k[j].
#pragma once

#include <cstdint>

#include "kernels/kv_quant.h"
#include "kernels/think_channels.h"

namespace dmc::kernels {

template <typename T>
void paged_decode_attention(T* out, T* probs, int probs_stride, const T* q, const T* k_pool,
                            const T* v_pool, const int32_t* page_table, const int* lengths,
                            int max_pages, int page_size, int B, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale);

template <typename T>
void paged_decode_attention_quantized(T* out, T* probs, int probs_stride, const T* q,
                                      const uint8_t* pages, const KvQuantPageLayout& layout,
                                      const int32_t* page_table, const int* q_lengths,
                                      int max_pages, const T* r_k_pool, const T* r_v_pool,
                                      const int32_t* residual_block, const int* r_lengths,
                                      int residual_slots, int B, int H, int Hkv, int D,
                                      bool exclude_ctrl, float scale);

template <typename T>
void paged_decode_attention_think(T* out, T* probs, int probs_stride, const T* q,
                                  const T* k_pages, const T* v_pages, const uint8_t* masks,
                                  int kept, const int32_t* page_table, const int* p_lengths,
                                  int max_pages, int page_size, const T* r_k_pool,
                                  const T* r_v_pool, const int32_t* residual_block,
                                  const int* r_lengths, int residual_slots, int B, int H, int Hkv,
                                  int D, bool exclude_ctrl, float scale);

}  // namespace dmc::kernels
