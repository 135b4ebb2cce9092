// Eviction by attention in the paged KV cache on the device's terms (the flat layer of
// kernels/paged_kv_write.h): after the decode attention of one layer, the H2O and TOVA baselines
// score every slot by the attention it received and drop the lowest-scored ones until a head
// holds `budget` slots. The same rules as the CPU cache's policies (inference/cache_policy.h,
// H2OUpdate and TovaUpdate), on R rows at once:
//
// Inputs: probs [n, H, probs_stride], the attention weights of step t = positions[i] of row i
//   (kernels::paged_decode_attention's layout); slot_pos of the layer must be set (every slot's
//   token position); query head g belongs to KV head g / G, G = H / Hkv.
//
// H2O, per (row i, KV head h), with the accumulated score of each slot in
//   scores [pages, page_size] (indexed like slot_pos, so a score travels with its page):
//     score(s) = (slot_pos(s) == t ? 0 : score(s)) + p[i, hG, s] + ... + p[i, hG + G − 1, s]
//       summed in fp32 in that order (the slot at position t was appended this step and starts
//       from 0, whatever its page held before);
//     while lengths[i, h] > budget: evict the slot of lowest score among those with
//       slot_pos(s) <= t − recent, ties to the lowest position.
// TOVA, per row i, one shared token set for the layer (all KV heads hold the same tokens in the
//   same slots, because they append and evict together):
//     mean(s) = sum_g fp64(p[i, g, s] / H)   (each weight divided in fp32, summed in fp64, g
//       ascending)
//     while lengths[i, 0] > budget: evict the slot of lowest mean, ties to the lowest position,
//       from every KV head.
// Evicting slot s of a head moves its last slot L into s (key and value rows, slot_pos, score)
//   and decrements the head's length, as PagedKvCache::Evict does, so the slot order equals the
//   CPU cache's; attention does not depend on slot order. TOVA also moves p[i, g, L] into
//   p[i, g, s] for every g (probs is consumed), so a second eviction of the same step sees the
//   moved slot's mean. Pages that empty stay in the page table: the host returns them.
#pragma once

#include <cstdint>

#include "kernels/paged_kv_write.h"

namespace dmc::kernels {

enum class EvictRule { kH2O, kTova };

struct EvictPolicy {
  EvictRule rule = EvictRule::kH2O;
  int budget = 0;  // slots a head keeps (TOVA: per layer, shared by its heads); >= 1
  int recent = 0;  // H2O: the recent window that is never evicted; < budget
};

// scores: H2O only (may be null for TOVA).
template <typename T>
void paged_kv_evict(const PagedKvLayer<T>& cache, float* scores, float* probs, int probs_stride,
                    const int32_t* positions, int n, int H, int Hkv, int D,
                    const EvictPolicy& policy);

}  // namespace dmc::kernels
