// The tile order of the attention kernels' persistent schedules (kernels/dmc_attention_sm90.cu,
// kernels/dmc_attention_bwd_sm90.cu: a CTA per SM taking work tiles one after another, the next
// one claimed from a counter in global memory), on the host for its tests and on the device.
//
// Each of `heads` heads (the kernel's own flattening of sequence and head) has tiles_per_head
// tiles of decreasing work, rank 0 the longest. The heads go in sections of `section` heads, one
// section after another (the last one may be smaller); within a section the longest tiles first,
// every head's tile of one rank before any tile of the next rank, so that the last tiles to start
// are the shortest (the tail of the run), while the tiles running at once read the K and V (or Q
// and dO) of about one section. Tile i of the order, 0 <= i < tiles_per_head · heads, is
//   s = i / (tiles_per_head · section),  j = i - s · tiles_per_head · section,
//   n = min(section, heads - s · section)      (heads in section s)
//   rank = j / n,  head = s · section + j % n.
#pragma once

#include <algorithm>

#include "kernels/host_device.h"

namespace dmc::cuda::detail {

struct PersistentTile {
  int rank, head;
};

DMC_HOST_DEVICE inline PersistentTile persistent_tile(int i, int tiles_per_head, int heads,
                                                     int section) {
  const int s = i / (tiles_per_head * section);
  const int j = i - s * tiles_per_head * section;
  const int in_section = heads - s * section < section ? heads - s * section : section;
  return {j / in_section, s * section + j % in_section};
}

// Heads per section: as many as keep a section's bytes (head_bytes each) within section_bytes,
// at least 1, at most heads. The forward's sections hold ~8 MB of K and V, about what the grid
// schedule's CTAs read at once (a head's tiles run together there): at 16 MB its T 8192 ran 11%
// slower than the grid one, at 8 MB 2% faster. The backward's hold ~16 MB of Q and dO: at 16 MB
// its T 8192 ran 9% faster than the grid one, at 8 MB 4% slower, the same within 1% at T 1024 to
// 4096 (an H100, two calls: bench/RESULTS.md, entries 26 and 27).
constexpr long kForwardSectionBytes = 8L << 20, kBackwardSectionBytes = 16L << 20;
inline int persistent_section(long head_bytes, int heads, long section_bytes) {
  const long section = section_bytes / std::max(1L, head_bytes);
  return static_cast<int>(std::min<long>(std::max(1L, section), heads));
}

}  // namespace dmc::cuda::detail
