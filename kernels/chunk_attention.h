// Attention of a chunk of n new tokens of ONE sequence that continues a paged KV cache (chunked
// prefill, inference/decode_engine.h): each chunk query sees a prefix of its head's cached slots
// and the chunk's own keys under the causal hard mask. model/DMC.md §6, model/DMS.md §3.
//
// Layout:
//   q, out        [n, H, D]    the chunk's queries (rotated at their positions), the output
//   k_pool, v_pool [pages, page_size, D], page_table [Hkv, max_pages]: the sequence's cache, as
//                 in kernels/decode_attention.h (one sequence: its page table serves every query)
//   prefix        [n, Hkv]     cached slots query t sees of KV head h: slots 0 .. prefix[t, h] − 1
//                              (may be 0)
//   k, v          [n, Hkv, D]  the chunk's keys (rotated) and values, as the cache holds them
//   mask          [n, Hkv]     additive, for key i < t (the diagonal exempt); null: none
// Query head g of query t reads KV head h = g / (H / Hkv):
//   s_p[j] = scale · q[t, g] · k_cache[h, j]          for j < prefix[t, h]
//   s_c[i] = scale · q[t, g] · k[i, h] + (i < t ? mask[i, h] : 0)   for i <= t
//   out[t, g] = softmax over all of s_p and s_c of the values v_cache[h, j] and v[i, h]
// (channel D−1 left out of q·k when exclude_ctrl: DMC's control channel). For DMC,
// mask[i, h] = −50000·α_{i+1} (the hard mask: key i is seen by t > i only if token i + 1
// appended) and k[i, h] = k̂_i, the open slot as it stood after token i; prefix[t, h] is the
// sequence's slots before the chunk, less its open slot when the chunk's first token merges into
// it (kernels/paged_kv_write.h, paged_kv_extend).
//
// The CUDA version is one FlashAttention-2 pass on tensor cores over the prefix's pages and then
// the chunk's keys, the query heads of a KV head together (kernels/chunk_attention.cu).
#pragma once

#include <cstdint>

namespace dmc::kernels {

template <typename T>
void chunk_attention(T* out, const T* q, const T* k_pool, const T* v_pool,
                     const int32_t* page_table, int max_pages, int page_size, const int* prefix,
                     const T* k, const T* v, const T* mask, int n, int H, int Hkv, int D,
                     bool exclude_ctrl, float scale);

}  // namespace dmc::kernels
