// The LoMA mask and position ids (kernels/loma_mask.h) against a dense reference written from the
// zone table, and the tile test the kernels skip work with against brute force over the tile.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "kernels/loma_mask.h"

namespace dmc {
namespace {

using kernels::LomaZones;

// The zone table, position by position: (chunk, zone) of each position and the rules
//   reading i → memory < i, reading i causal;  memory i → memory < i, reading i, memory i causal;
//   repetition i → memory ≤ i, repetition i causal.
std::vector<std::vector<bool>> DenseMask(const LomaZones& z, int chunks) {
  enum { kRead, kMem, kRep };
  std::vector<int> chunk_of, zone_of;
  for (int i = 0; i < chunks; ++i) {
    for (int r = 0; r < z.t * z.c; ++r) chunk_of.push_back(i), zone_of.push_back(kRead);
    for (int m = 0; m < z.t; ++m) chunk_of.push_back(i), zone_of.push_back(kMem);
    for (int r = 0; r < z.t * z.c; ++r) chunk_of.push_back(i), zone_of.push_back(kRep);
  }
  const int T = static_cast<int>(chunk_of.size());
  std::vector<std::vector<bool>> mask(T, std::vector<bool>(T, false));
  for (int p = 0; p < T; ++p)
    for (int j = 0; j < T; ++j) {
      const int cp = chunk_of[p], cj = chunk_of[j], zp = zone_of[p], zj = zone_of[j];
      bool ok;
      if (cj < cp) ok = zj == kMem;
      else if (cj > cp) ok = false;
      else if (zp == kRead) ok = zj == kRead && j <= p;
      else if (zp == kMem) ok = zj == kRead || (zj == kMem && j <= p);
      else ok = zj == kMem || (zj == kRep && j <= p);
      mask[p][j] = ok;
    }
  return mask;
}

const LomaZones kShapes[] = {{1, 1}, {1, 4}, {2, 2}, {2, 4}, {3, 1}, {3, 2}};

TEST(LomaMask, EqualsDenseReference) {
  for (const LomaZones& z : kShapes) {
    const int chunks = 3;
    const auto dense = DenseMask(z, chunks);
    const int T = static_cast<int>(dense.size());
    ASSERT_EQ(T, chunks * z.chunk());
    int allowed = 0;
    for (int p = 0; p < T; ++p)
      for (int j = 0; j < T; ++j) {
        ASSERT_EQ(kernels::loma_allowed(p, j, z), dense[p][j])
            << "t " << z.t << " c " << z.c << " query " << p << " key " << j;
        allowed += dense[p][j];
      }
    // a sanity bound that the mask is sparse: strictly fewer pairs than causal attention
    EXPECT_LT(allowed, T * (T + 1) / 2);
  }
}

TEST(LomaMask, TileTestEqualsBruteForce) {
  const int sizes[] = {1, 2, 3, 5, 8, 16};
  for (const LomaZones& z : kShapes) {
    const auto dense = DenseMask(z, 3);
    const int T = static_cast<int>(dense.size());
    int skipped = 0;
    for (int qs : sizes)
      for (int ks : sizes)
        for (int q0 = 0; q0 < T; ++q0)
          for (int k0 = 0; k0 < T; ++k0) {
            const int q1 = std::min(q0 + qs, T), k1 = std::min(k0 + ks, T);
            bool any = false;
            for (int p = q0; p < q1 && !any; ++p)
              for (int j = k0; j < k1 && !any; ++j) any = dense[p][j];
            ASSERT_EQ(kernels::loma_tile_active(q0, q1, k0, k1, z), any)
                << "t " << z.t << " c " << z.c << " tile [" << q0 << "," << q1 << ")x[" << k0
                << "," << k1 << ")";
            skipped += !any && k0 < q1;  // below the diagonal yet empty: the block structure
          }
    EXPECT_GT(skipped, 0) << "t " << z.t << " c " << z.c;
  }
}

// The documented position ids, written out for t = 2, c = 2 (chunk of 4 + 2 + 4 positions).
TEST(LomaMask, PositionIds) {
  const LomaZones z{2, 2};
  const std::vector<int> expected = {
      0, 1, 2, 3, /* <m> */ 1, 3, /* <r> */ 0, 1, 2, 3,  //
      4, 5, 6, 7, /* <m> */ 5, 7, /* <r> */ 4, 5, 6, 7};
  for (int p = 0; p < static_cast<int>(expected.size()); ++p)
    EXPECT_EQ(kernels::loma_position(p, z), expected[p]) << "layout position " << p;
}

}  // namespace
}  // namespace dmc
