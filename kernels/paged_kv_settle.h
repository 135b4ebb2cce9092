// Which slots of a quantized paged KV cache close into pages, on the device's terms: the flat
// layout of kernels/paged_kv_write.h with the settling of inference/paged_kv_cache.h.
//
// Layout of one layer (R rows, Hkv KV heads; head = row · Hkv + h):
//   page_table  [R, Hkv, max_pages]  quantized page m of a head is page_table[head·max_pages + m]
//   q_lengths   [R, Hkv]             slots in the head's quantized pages (a multiple of page_size)
//   r_lengths   [R, Hkv]             slots after those, at full precision in the head's residual
//                                    block: slot q_lengths + j is row j of block `head` of the
//                                    layer's residual pool [R·Hkv, residual_slots, D]
//   r_pos, r_marks, r_scores         [R·Hkv, residual_slots], beside the residual rows (null when
//                                    the cache has none): each residual slot's token position and
//                                    DMS mark (kernels/paged_kv_dms_evict.h), ZipCache's
//                                    accumulated attention
// A slot settles once a token more than settle_lag positions newer arrives (vanilla and DMC: 0,
// as soon as a newer slot opens; DMS: w + 1, once it is past the eviction window), and every
// page_size settled slots close into a page. Between steps fewer than page_size settled slots
// wait in the residual, so a step closes at most one page per head.
//
// These ops decide what closes; kernels/kv_quant.h's kv_quantize_pages (CUDA) writes the pages
// from the lists they fill, entry j:
//   page_ids[j]            the page to write, or −1: nothing (the quantizer skips the entry)
//   rows[j·page_size + r]  the row, in the pool the quantizer gathers from, of the page's row r
//                          (rows [0, salient_slots) are ZipCache's salient tier)
//
// paged_kv_settle_step (settle lag 0): before the append of one token per row i < n (at
// positions[i]), for each head of those rows. The token merges into the open slot (merge_ih, as
// paged_kv_append decides it) when merge is not null, merge[i, h] > 0.5, r_lengths > 0 and
// positions[i] > 0. When it does not and the residual is full (r_lengths = page_size), the
// residual's rows close into page m = q_lengths / page_size:
//   page_ids[head] = page_table[head·max_pages + m], rows[head·page_size + r] =
//   head·residual_slots + order(r), q_lengths += page_size, r_lengths = 0 (the append then writes
//   row 0);
// otherwise page_ids[head] = −1. order is the residual's slot order, or with r_scores (ZipCache,
// the vanilla cache: residual slot j holds token t − page_size + j, seen by page_size − j
// queries) the slots by normalized attention score r_scores[j] / (page_size − j), highest first,
// ties to the older slot. This is PagedKvCache::Settle at settle lag 0: the new slot settles every
// older one, and page_size settled slots fill a page.
//
// A slot at a time (slots_settle: per-token keys, kernels/kv_quant.h; settle lag 0, a residual of
// one slot): each slot settles into the next row of its head's last page as soon as a newer slot
// opens, the last page filling a row at a time (q_lengths any count). The lists then hold a row
// each, entry j: page_ids[j] (−1: nothing), page_rows[j] the row of that page, rows[j] the row of
// the pool the quantizer gathers it from (kernels/cuda_ops.h's kv_quantize_rows). The step: when
// the token does not merge (as above) and the residual holds its slot (r_lengths = 1), that slot
// settles into row q_lengths mod page_size of page m = q_lengths / page_size:
//   page_ids[head] = page_table[head·max_pages + m], page_rows[head] = q_lengths mod page_size,
//   rows[head] = head·residual_slots, q_lengths += 1, r_lengths = 0;
// otherwise page_ids[head] = −1.
//
// paged_kv_settle_lagged_step (settle lag L = settle_lag > 0, DMS; r_pos and r_marks set): before
// the append of the token at t = positions[i], per head: the residual slots j < r_lengths with
// r_pos[j] < t − L have settled. When page_size of them have (or more), the page_size oldest
// close into page m = q_lengths / page_size in position order (r-th oldest → page row r): their
// rows are copied to rows head·page_size + r of stage_k and stage_v [n·Hkv·page_size, D],
// page_ids[head] = page_table[head·max_pages + m], rows[head·page_size + r] = head·page_size + r;
// the residual's other slots move up in their order (key and value rows, r_pos, r_marks),
// q_lengths += page_size and r_lengths −= page_size. Otherwise page_ids[head] = −1. This is
// PagedKvCache::Settle at settle lag L: its page takes the oldest settled slots, and the rest of
// the residual keeps its order.
//
// paged_kv_settle_prefill: after paged_kv_prefill (or paged_kv_dms_prefill) wrote the S =
// r_lengths[row, h] slots of a prompt of `tokens` tokens of row `row` into a staging pool (slot s
// of KV head h at row h·stage_stride + s of stage_k and stage_v [Hkv·stage_stride, D]; DMS: its
// position and mark at the same index of stage_pos and stage_marks), the state the prompt's
// appends leave. The settled slots are the first `settled` ones: S − 1 at settle lag 0 (all but
// the newest), else those with stage_pos < tokens − 1 − settle_lag (the slots are in position
// order). With C = page_size · floor(settled / page_size), entry j = h·max_closed + m
// (m < max_closed) is page m of the head, page_ids[j] = page_table[head·max_pages + m] and
// rows[j·page_size + r] = h·stage_stride + m·page_size + r when m < C / page_size, else −1;
// slots C..S − 1 are copied into rows 0..S − C − 1 of the head's residual block of r_k and r_v
// (DMS: and their positions and marks into r_pos, r_marks); q_lengths = C, r_lengths = S − C.
// A slot at a time: C = settled, and entry j = h·max_closed·page_size + i (i < max_closed ·
// page_size) is slot i: page_ids[j] = page_table[head·max_pages + i / page_size] when i < C,
// else −1, page_rows[j] = i mod page_size, rows[j] = h·stage_stride + i.
//
// paged_kv_settle_scores (ZipCache): after the step's attention, whose weights probs [n, H,
// probs_stride] index each head's slots as the quantized attention reads them (its q_lengths
// quantized slots, then its residual), every residual slot j < r_lengths of head (i, h) adds the
// attention it received from the query heads g of its KV head (H / Hkv of them, in order):
//   r_scores[j] = (j = r_lengths − 1 ? 0 : r_scores[j]) + Σ_g probs[(i·H + g)·probs_stride +
//                 q_lengths + j]
// the newest slot, appended this step, starting from 0: AccumulateAttention
// (inference/cache_policy.h) on the residual slots, the only ones a later page takes.
#pragma once

#include <cstdint>

#include "kernels/host_device.h"

namespace dmc::kernels {

struct KvSettleLayer {
  const int32_t* page_table = nullptr;
  int32_t* q_lengths = nullptr;
  int32_t* r_lengths = nullptr;
  int max_pages = 0, page_size = 0, residual_slots = 0;
  int settle_lag = 0;
  int32_t* r_pos = nullptr;
  uint8_t* r_marks = nullptr;
  float* r_scores = nullptr;
  bool slots_settle = false;  // a slot at a time (per-token keys): the lists hold a row each
};

// A slot at a time, the step's rule for a head whose residual slot settles (above): its entry and
// lengths. The CPU reference and the CUDA kernel share it.
DMC_HOST_DEVICE inline void KvSettleSlot(const KvSettleLayer& c, long head, int32_t* page_ids,
                                         int32_t* page_rows, int32_t* rows) {
  const int q = c.q_lengths[head];
  page_ids[head] = c.page_table[head * c.max_pages + q / c.page_size];
  page_rows[head] = q % c.page_size;
  rows[head] = static_cast<int32_t>(head * c.residual_slots);
  c.q_lengths[head] = q + 1;
  c.r_lengths[head] = 0;
}

// A prefill's list length per head, max_closed (above): its tokens − 1 settled slots at most in
// whole pages, or, a slot at a time, in pages the last of which is partly filled.
inline int KvSettlePrefillMaxClosed(int tokens, int page_size, bool slots_settle) {
  const int settled = tokens - 1;
  return slots_settle ? (settled + page_size - 1) / page_size : settled / page_size;
}

// page_rows: the rows' places in their pages when layer.slots_settle (else unused, may be null).
void paged_kv_settle_step(int32_t* page_ids, int32_t* page_rows, int32_t* rows,
                          const KvSettleLayer& layer, const float* merge,
                          const int32_t* positions, int n, int Hkv);

template <typename T>
void paged_kv_settle_lagged_step(int32_t* page_ids, int32_t* rows, T* stage_k, T* stage_v,
                                 const KvSettleLayer& layer, T* r_k, T* r_v,
                                 const int32_t* positions, int n, int Hkv, int D);

template <typename T>
void paged_kv_settle_prefill(int32_t* page_ids, int32_t* page_rows, int32_t* rows, int max_closed,
                             const KvSettleLayer& layer, T* r_k, T* r_v, const T* stage_k,
                             const T* stage_v, const int32_t* stage_pos,
                             const uint8_t* stage_marks, int stage_stride, int row, int tokens,
                             int Hkv, int D);

void paged_kv_settle_scores(const KvSettleLayer& layer, const float* probs, int probs_stride,
                            int n, int H, int Hkv);

}  // namespace dmc::kernels
