// Dropping a span of slots from the heads of the paged KV cache on the device's terms (the flat
// layer of kernels/paged_kv_write.h): LoMA's compression, which removes a finished segment from
// between a head's memory slots and the t new ones its <m> tokens just appended (the CPU cache's
// PagedKvCache::Remove, inference/paged_decoder.h).
//
// paged_kv_drop_span, rows 0 .. n − 1, every KV head h (head = i · Hkv + h, L = lengths[head],
// count + keep <= L):
//   for j = 0 .. keep − 1, in order:  slot L − keep − count + j  ←  slot L − keep + j
//                                     (key and value rows, and slot_pos when it is set)
//   lengths[head] = L − count
// so the last `keep` slots move down over the `count` before them, in order. Pages that empty
// stay in the page table: the host returns them (kernels/paged_kv_pages.h).
#pragma once

#include "kernels/paged_kv_write.h"

namespace dmc::kernels {

template <typename T>
void paged_kv_drop_span(const PagedKvLayer<T>& cache, int n, int Hkv, int D, int count, int keep);

}  // namespace dmc::kernels
