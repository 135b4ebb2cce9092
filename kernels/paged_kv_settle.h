// Which slots of a quantized paged KV cache close into pages, on the device's terms: the flat
// layout of kernels/paged_kv_write.h with the settling of inference/paged_kv_cache.h, for the
// caches whose slots settle as soon as a newer one opens (vanilla and DMC: settle lag 0).
//
// Layout of one layer (R rows, Hkv KV heads; head = row · Hkv + h):
//   page_table  [R, Hkv, max_pages]  quantized page m of a head is page_table[head·max_pages + m]
//   q_lengths   [R, Hkv]             slots in the head's quantized pages (a multiple of page_size)
//   r_lengths   [R, Hkv]             slots after those, at full precision in the head's residual
//                                    block: slot q_lengths + j is row j of block `head` of the
//                                    layer's residual pool [R·Hkv, residual_slots, D]
// Between steps a head of S >= 1 slots has q_lengths = page_size · floor((S − 1) / page_size) and
// 1 <= r_lengths <= page_size: every slot but the newest settled, page_size of them to a page.
//
// These ops decide what closes; kernels/kv_quant.h's kv_quantize_pages (CUDA) writes the pages
// from the lists they fill, entry j:
//   page_ids[j]            the page to write, or −1: nothing (the quantizer skips the entry)
//   rows[j·page_size + r]  the row, in the pool the quantizer gathers from, of the page's row r
//
// paged_kv_settle_step: before the append of one token per row i < n (at positions[i]), for each head
// of those rows. The token merges into the open slot (merge_ih, as paged_kv_append decides it)
// when merge is not null, merge[i, h] > 0.5, r_lengths > 0 and positions[i] > 0. When it does not
// and the residual is full (r_lengths = page_size), the residual's rows 0..page_size − 1 (its
// slots in order) close into page m = q_lengths / page_size:
//   page_ids[head] = page_table[head·max_pages + m], rows[head·page_size + r] =
//   head·residual_slots + r, q_lengths += page_size, r_lengths = 0 (the append then writes row 0);
// otherwise page_ids[head] = −1. This is PagedKvCache::Settle at settle lag 0: the new slot
// settles every older one, and page_size settled slots fill a page.
//
// paged_kv_settle_prefill: after paged_kv_prefill wrote the S = r_lengths[row, h] slots of a prompt of
// row `row` into a staging pool (slot s of KV head h at row h·stage_stride + s of stage_k and
// stage_v [Hkv·stage_stride, D]), the state the prompt's appends leave: with C = page_size ·
// floor((S − 1) / page_size), entry j = h·max_closed + m (m < max_closed) is page m of the head,
// page_ids[j] = page_table[head·max_pages + m] and rows[j·page_size + r] = h·stage_stride +
// m·page_size + r when m < C / page_size, else −1; slots C..S − 1 are copied into rows 0..S − C − 1
// of the head's residual block of r_k and r_v; q_lengths = C, r_lengths = S − C.
#pragma once

#include <cstdint>

namespace dmc::kernels {

struct KvSettleLayer {
  const int32_t* page_table = nullptr;
  int32_t* q_lengths = nullptr;
  int32_t* r_lengths = nullptr;
  int max_pages = 0, page_size = 0, residual_slots = 0;
};

void paged_kv_settle_step(int32_t* page_ids, int32_t* rows, const KvSettleLayer& layer,
                    const float* merge, const int32_t* positions, int n, int Hkv);

template <typename T>
void paged_kv_settle_prefill(int32_t* page_ids, int32_t* rows, int max_closed, const KvSettleLayer& layer,
                       T* r_k, T* r_v, const T* stage_k, const T* stage_v, int stage_stride,
                       int row, int Hkv, int D);

}  // namespace dmc::kernels
