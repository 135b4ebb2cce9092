// DMS's delayed eviction (model/DMS.md §5) in the paged KV cache on the device's terms (the flat
// layer
// of kernels/paged_kv_write.h): the rule of the CPU cache's DmsUpdate (inference/cache_policy.h)
// on R rows at once. A token t marked by the next token's decision (d_{t+1} = 1) stays visible to
// itself and the next w queries, then leaves its head; its slot is reused.
//
// Every slot carries a mark beside its position, marks [pages, page_size] (1: the token is
// marked), indexed like slot_pos, so that a mark travels with its page whatever row it serves.
// The layer's slot_pos must be set (paged_kv_append and paged_kv_prefill write it).
//
// paged_kv_dms_evict: the decode step, after paged_kv_append of the token at t = positions[i]
// (merge null: every token appends) and before its attention; per (row i, KV head h), with
// evict [n, Hkv] the hard decisions d_t of the step's tokens (> 0.5: evict) and w the window:
//   every slot s of the head, with p = slot_pos(s):
//     p == t:                                   marks(s) = 0  (the new token enters unmarked,
//                                               whatever its page held before)
//     p == t − 1, t > 0 and evict[i, h] > 0.5:  marks(s) = 1  (d_t marks token t − 1)
//   then the slot with p == t − w − 1 and marks(s) = 1, if any, leaves: the head's last slot
//   moves into it (key and value rows, slot_pos, mark) and lengths[i, h] decrements, as
//   PagedKvCache::Evict does, so the slots stay in the CPU cache's order. At most one token
//   leaves a head per step (w = 0: token t − 1, marked and gone in the same step). Pages that
//   empty stay in the page table: the host returns them.
//
// paged_kv_dms_prefill: a whole prompt of P tokens of row `row` at positions 0..P−1 from the
// parallel forward with hard decisions (k, v [P, Hkv, D] pre-RoPE, evict [P, Hkv]), the state the
// P decode steps would leave, per KV head h:
//   token t has left when t + w + 1 <= P − 1 and evict[t + 1, h] > 0.5 (its mark came at step
//     t + 1, its exit at step t + w + 1 inside the prompt);
//   the others keep slots in position order: slot(t) = kept tokens before t, holding
//     RoPE(k[t], t), v[t], slot_pos = t, mark = (t + 1 < P and evict[t + 1, h] > 0.5);
//   lengths[row, h] = kept tokens.
// This is paged_kv_prefill with merge'[s, h] = evict[s, h] for s <= P − w − 1 and 0 after (a
// token that has left shares its slot with the next token, which overwrites it). The token-by-
// token cache holds the same tokens with the same marks in another order (each exit moves the
// last slot); neither attention nor later exits, which find a token by its position, depend on
// the order.
#pragma once

#include <cstdint>

#include "kernels/paged_kv_write.h"

namespace dmc::kernels {

template <typename T>
void paged_kv_dms_evict(const PagedKvLayer<T>& cache, uint8_t* marks, const float* evict,
                        const int32_t* positions, int n, int Hkv, int D, int window);

template <typename T>
void paged_kv_dms_prefill(const PagedKvLayer<T>& cache, uint8_t* marks, int row, const T* k,
                          const T* v, const float* evict, int P, int Hkv, int D, int window,
                          float theta);

}  // namespace dmc::kernels
