// Writes into the paged KV cache on the device's terms: flat arrays that the CUDA decoder keeps
// on the GPU and the kernels fill, one layer at a time (the CPU decoder's PagedKvCache holds the
// same content as objects; inference/paged_kv_cache.h). model/DMC.md §6.
//
// Layout of one layer (R rows: the sequences of the running batch, row i = batch entry i):
//   k_pool, v_pool  [pages, page_size, D]  rotated keys, values; page ids are shared by all
//                   layers (one pool)
//   slot_pos        [pages, page_size]     the token position of each slot (may be null)
//   page_table      [R, Hkv, max_pages]    slot s of head (i, h) is row s % page_size of page
//                   page_table[(i·Hkv + h)·max_pages + s / page_size]; the host assigns pages
//                   before a write can need them
//   lengths         [R, Hkv]               slots held
//   window          [R, Hkv, w, 2D]        DMC only (w > 0): the open slot's window state, a
//                   ring indexed by token position mod w: the raw (pre-RoPE) key and value
//                   (channels 0..D−1, D..2D−1) of the newest tokens merged into the open slot,
//                   as the projections gave them (element type T: bf16 on the GPU holds them
//                   exactly); the means over it are taken in fp32
//   window_omega    [R, Hkv, w]            their importances omega, the same ring (kept apart so
//                   that every entry's key and value start 16-byte aligned: vector loads)
//   window_count    [R, Hkv]               how many of those the ring holds (<= w)
//
// paged_kv_append: one new token per row i (at positions[i]) and KV head h, the decode step:
//   merge_ih = merge[i, h] > 0.5 and lengths[i, h] > 0 and positions[i] > 0   (merge null: never)
//   append:  s = lengths[i, h]++, the window forgets the previous slot (count = 0)
//   merge:   s = lengths[i, h] − 1 (the open slot)
//   w > 0:   the token enters the ring (count = min(count + 1, w)); the slot's key and value are
//            the omega-weighted means over the ring (oldest first), omega = 1 when omega is null
//   w = 0:   the slot's key and value are the token's
//   the key is stored rotated at positions[i] (RoPE, control channel D−1 kept when
//   keep_last_channel), slot_pos = positions[i].
// With merge null and w = 0 this is the vanilla cache (and the append of H2O and TOVA).
//
// paged_kv_prefill: a whole prompt of P tokens of row `row` at positions 0..P−1, from the
// parallel forward with hard decisions (inputs [P, Hkv, D] and [P, Hkv]), the state the same P
// appends would leave:
//   token t appends when t = 0 or merge[t, h] <= 0.5; slot(t) = appends in [0, t] − 1;
//   the slot of t is final at t when t = P − 1 or token t + 1 appends; it holds
//   RoPE(khat[t], t) and vhat[t] (the scan's windowed means, kernels/dmc_scan.h, which equal the
//   ring means above), slot_pos = t;
//   w > 0: the ring holds the raw k, v, omega of positions max(t0, P − w) .. P − 1, t0 the last
//   append, count = min(P − t0, w).
// Without DMC (merge null), khat = k and vhat = v.
//
// paged_kv_extend: a chunk of n tokens continuing row `row` (which may hold slots) at positions
// start .. start + n − 1 (chunked prefill): token t is appended exactly as paged_kv_append
// appends it, in order, and leaves the state the same n steps would. It also gives what the
// chunk's attention (kernels/chunk_attention.h) reads:
//   khat[t, h], vhat[t, h]   the slot token t wrote, as stored (rotated key, value): the open
//                            slot as it stood after token t (DMC's k̂_t)
//   prefix[t, h]             = lengths[row, h] before the chunk, less 1 when the chunk's first
//                            token merges into the open slot (which it rewrites); the same for
//                            every t: the cached slots the chunk's queries see
//
// The host's hand-out of pages into the tables: kernels/paged_kv_pages.h.
#pragma once

#include <cstdint>

#include "kernels/host_device.h"

namespace dmc::kernels {

template <typename T>
struct PagedKvLayer {
  T* k_pool = nullptr;
  T* v_pool = nullptr;
  int32_t* slot_pos = nullptr;
  const int32_t* page_table = nullptr;
  int32_t* lengths = nullptr;
  T* window = nullptr;
  float* window_omega = nullptr;
  int32_t* window_count = nullptr;
  int max_pages = 0, page_size = 0, window_size = 0;
};

// The pool row of `slot` of (row, KV head) `head` = row · Hkv + h: its page's row plus its offset
// (the CPU references and the CUDA kernels read the layout through this one function).
template <typename T>
DMC_HOST_DEVICE inline long SlotRow(const PagedKvLayer<T>& c, long head, int slot) {
  return static_cast<long>(c.page_table[head * c.max_pages + slot / c.page_size]) * c.page_size +
         slot % c.page_size;
}

// Copies slot `from`'s key and value rows, position (none when slot_pos is null) and per-slot
// value (H2O's score, DMS's mark; none when extra is null) into slot `to` (pool rows): how the
// eviction kernels close a hole with a head's last slot, and LoMA's compression moves its memory
// slots (kernels/paged_kv_drop.h). Channels first, first + step, ... are this thread's (CPU: 0
// and 1; CUDA: the block's threads), and thread 0 moves the position and the extra.
template <typename T, typename Extra>
DMC_HOST_DEVICE inline void MoveSlot(const PagedKvLayer<T>& c, Extra* extra, long to, long from,
                                     int D, int first, int step) {
  for (int d = first; d < D; d += step) {
    c.k_pool[to * D + d] = c.k_pool[from * D + d];
    c.v_pool[to * D + d] = c.v_pool[from * D + d];
  }
  if (first == 0) {
    if (c.slot_pos != nullptr) c.slot_pos[to] = c.slot_pos[from];
    if (extra != nullptr) extra[to] = extra[from];
  }
}

template <typename T>
void paged_kv_append(const PagedKvLayer<T>& cache, const T* k, const T* v, const float* merge,
                     const float* omega, const int32_t* positions, int n, int Hkv, int D,
                     float theta, bool keep_last_channel);

template <typename T>
void paged_kv_prefill(const PagedKvLayer<T>& cache, int row, const T* khat, const T* vhat,
                      const T* k, const T* v, const float* merge, const float* omega, int P,
                      int Hkv, int D, float theta, bool keep_last_channel);

template <typename T>
void paged_kv_extend(const PagedKvLayer<T>& cache, int row, const T* k, const T* v,
                     const float* merge, const float* omega, int start, int n, int Hkv, int D,
                     float theta, bool keep_last_channel, T* khat, T* vhat, int* prefix);

}  // namespace dmc::kernels
