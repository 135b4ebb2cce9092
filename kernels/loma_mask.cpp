// Tile test of the LoMA mask (spec: kernels/loma_mask.h). A key j of [k0, k1) is allowed for
// some query p of [q0, q1) iff j < q1 and one of:
//   - j ≥ q0: the query p = j sees itself;
//   - j ≥ lo(q0): lo(p) is non-decreasing in p (it is the start of p's chunk, or the start of
//     the chunk's memory zone for repetition queries), so q0 has the widest range [lo(q0), q0];
//   - j is a memory position: every later query sees it.
// Since lo(q0) ≤ q0, the first two merge into "j ≥ lo(q0)", and the tile is active iff
// [max(k0, lo(q0)), min(k1, q1)) is not empty or [k0, min(k1, q1)) holds a memory position.
#include "kernels/loma_mask.h"

#include <algorithm>

namespace dmc::kernels {
namespace {

// The first memory position at or after a.
int next_memory_position(int a, const LomaZones& z) {
  const int o = a % z.chunk(), base = a - o;
  if (o < z.segment()) return base + z.segment();
  if (o < z.segment() + z.t) return a;
  return base + z.chunk() + z.segment();
}

}  // namespace

bool loma_tile_active(int q0, int q1, int k0, int k1, const LomaZones& z) {
  if (q0 >= q1 || k0 >= k1) return false;
  const int end = std::min(k1, q1);
  if (std::max(k0, loma_range_start(q0, z)) < end) return true;
  return k0 < end && next_memory_position(k0, z) < end;
}

}  // namespace dmc::kernels
