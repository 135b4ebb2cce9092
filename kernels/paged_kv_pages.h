// The paged cache's page bookkeeping on the device's terms (kernels/paged_kv_write.h's layout):
// which heads must be handed a page before a step and which return pages after it, found on the
// device so the host touches only those heads, never every head of every sequence.
//
// Per head (layer l, row r, KV head h; flat index head = (l·R + r)·Hkv + h) of a cache with page
// size P:
//   residual  = lengths[head]    a bf16 head's slots; a quantized head's residual block's
//   quantized = q_lengths[head]  a quantized head's slots in quantized pages (q_lengths null: 0)
//   keep      = quantized cache: ⌊quantized / P⌋; else ⌈residual / P⌉
//               the pages the head holds between steps (the CPU cache's count)
//   grow(t)   = quantized cache: ⌊quantized / P⌋ + ⌊min(residual + t − 1, P − 1 + t) / P⌋;
//               else ⌈(residual + t) / P⌉
//               the most it holds after t more tokens (the CPU cache's PagesForTokens: each token
//               may be a new slot; a quantized head's residual holds fewer than P settled slots
//               and each token settles at most one more, the newest never)
//   a quantized cache whose slots settle one at a time (slots_settle: kernels/kv_quant.h's
//   per-token keys; the CPU cache, inference/paged_kv_cache.h) fills its last page a row at a
//   time:
//   keep      = ⌈quantized / P⌉
//   grow(t)   = ⌈(quantized + residual + t − 1) / P⌉   (each token may be a new slot, and every
//               slot but the newest may have settled)
//   a layer that writes no cache (writes[l] = 0: it reads another layer's, KVSharer) keeps and
//   grows 0.
//
// paged_kv_page_changes, rows row0 .. row0 + n − 1 of L layers, after a step or a prefill and
// before one of t tokens: every head i = l·Hkv + h of row row0 + j with held ≠ grow(t) gets an
// entry, in order of i, in that row's list changes[j · L·Hkv + ...]
//   {i, trim = max(0, held − grow(t)), grow = max(0, grow(t) − held)}    (counts[j] of them)
// and held = min(held, grow(t)): the host returns the last `trim` pages of the head's table and
// hands out `grow` more before the next step. A head keeps the pages its worst case needs: one
// whose last page is full holds the next page while it merges, rather than returning it after
// every step and taking it back before the next (at CR 8 most of a step's heads with a full last
// page merge, and the round trip was ~7,000 pages a step at Llama-2-7B's shape).
// row_slots[j] = Σ_{l, h} residual + quantized of that row; row_spare[j] = Σ_{l, h} grow(t) − keep,
// the pages beyond the kept ones that the row holds once the host has handed them out (the bytes
// a sequence is charged, KvSequenceBytes, count only the kept ones).
//
// paged_kv_assign_pages: page_table[index[j]] = page[j] (flat into the tables [L, R, Hkv,
// max_pages]) and held[index[j] / max_pages] = max(held, index[j] mod max_pages + 1): the pages
// the host hands out, in table order.
//
// paged_kv_clear_rows: rows row0 .. row0 + n − 1 of L layers, which hold no sequence, become a
// step's padding rows (inference/cuda_engine.h runs a step of a few batch sizes, its free rows
// inert): every head's lengths, q_lengths (when not null) and window_count = 0, and the first
// entry of its page table = sink, a page no sequence holds. A step's append then writes each of
// their heads' token into slot 0 of the sink page (or of its own residual block), and its
// attention, eviction and settling see a head of that one slot: none of them reads or writes
// another row's pages. held is left alone: a sequence admitted to the row starts from 0.
#pragma once

#include <cstdint>

#include "kernels/host_device.h"

namespace dmc::kernels {

struct PageChange {
  int32_t head, trim, grow;  // head: l · Hkv + h of its row
};

DMC_HOST_DEVICE inline int KvPagesKept(int residual, int quantized, int page_size, bool quant) {
  return quant ? quantized / page_size : (residual + page_size - 1) / page_size;
}

DMC_HOST_DEVICE inline int KvPagesToGrow(int residual, int quantized, int tokens, int page_size,
                                         bool quant) {
  if (!quant) return (residual + tokens + page_size - 1) / page_size;
  const int settled = residual + tokens - 1 < page_size - 1 + tokens ? residual + tokens - 1
                                                                     : page_size - 1 + tokens;
  return quantized / page_size + settled / page_size;
}

DMC_HOST_DEVICE inline int KvSlotPagesKept(int quantized, int page_size) {
  return (quantized + page_size - 1) / page_size;
}

DMC_HOST_DEVICE inline int KvSlotPagesToGrow(int residual, int quantized, int tokens,
                                             int page_size) {
  const int settled = residual + tokens - 1 > 0 ? residual + tokens - 1 : 0;
  return (quantized + settled + page_size - 1) / page_size;
}

// The heads' lengths and pages, rows [row0, row0 + n) of R, L layers of Hkv heads.
struct PagedKvPages {
  const int32_t* lengths = nullptr;    // [L, R, Hkv]
  const int32_t* q_lengths = nullptr;  // [L, R, Hkv], null: not quantized
  const uint8_t* writes = nullptr;     // [L], null: every layer writes its cache
  int32_t* held = nullptr;             // [L, R, Hkv] pages in each head's table
  int L = 0, R = 0, Hkv = 0, page_size = 0;
  bool slots_settle = false;  // quantized, a slot at a time (per-token keys): KvSlotPages*
};

// keep and grow(t) of a head of layer l (above), as the cache of p counts them.
DMC_HOST_DEVICE inline int KvHeadPagesKept(const PagedKvPages& p, int l, int residual,
                                           int quantized) {
  if (p.writes != nullptr && !p.writes[l]) return 0;
  return p.slots_settle ? KvSlotPagesKept(quantized, p.page_size)
                        : KvPagesKept(residual, quantized, p.page_size, p.q_lengths != nullptr);
}
DMC_HOST_DEVICE inline int KvHeadPagesToGrow(const PagedKvPages& p, int l, int residual,
                                             int quantized, int tokens) {
  if (p.writes != nullptr && !p.writes[l]) return 0;
  return p.slots_settle
             ? KvSlotPagesToGrow(residual, quantized, tokens, p.page_size)
             : KvPagesToGrow(residual, quantized, tokens, p.page_size, p.q_lengths != nullptr);
}

void paged_kv_page_changes(const PagedKvPages& pages, int row0, int n, int tokens,
                           PageChange* changes, int32_t* counts, int32_t* row_slots,
                           int32_t* row_spare);

void paged_kv_assign_pages(int32_t* page_table, int32_t* held, const int64_t* index,
                           const int32_t* page, int n, int max_pages);

void paged_kv_clear_rows(int32_t* page_table, int32_t* lengths, int32_t* q_lengths,
                         int32_t* window_count, int32_t sink, int L, int R, int Hkv,
                         int max_pages, int row0, int n);

}  // namespace dmc::kernels
