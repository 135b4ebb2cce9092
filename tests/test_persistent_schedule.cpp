// The persistent attention schedules' tile order (kernels/persistent_schedule.h): every tile
// index maps to a distinct (rank, head), all of them are covered, sections run one after another,
// and within a section no tile starts before a longer one; the section size's bounds.
#include <set>
#include <utility>

#include "gtest/gtest.h"
#include "kernels/persistent_schedule.h"

namespace dmc {
namespace {
using cuda::detail::persistent_section;
using cuda::detail::persistent_tile;
using cuda::detail::PersistentTile;

TEST(PersistentSchedule, EveryTileOnceSectionsInOrderLongestFirst) {
  for (int tiles = 1; tiles <= 17; ++tiles)
    for (int heads = 1; heads <= 23; ++heads)
      for (int section = 1; section <= heads; ++section) {
        SCOPED_TRACE(testing::Message() << tiles << " tiles a head, " << heads
                                        << " heads, sections of " << section);
        std::set<std::pair<int, int>> seen;
        int last_section = 0, last_rank = 0;
        for (int i = 0; i < tiles * heads; ++i) {
          const PersistentTile t = persistent_tile(i, tiles, heads, section);
          ASSERT_GE(t.rank, 0);
          ASSERT_LT(t.rank, tiles);
          ASSERT_GE(t.head, 0);
          ASSERT_LT(t.head, heads);
          ASSERT_TRUE(seen.insert({t.rank, t.head}).second) << "tile " << i << " repeats one";
          const int s = t.head / section;
          ASSERT_GE(s, last_section) << "tile " << i << " goes back to an earlier section";
          if (s == last_section) {
            ASSERT_GE(t.rank, last_rank) << "tile " << i << " is longer than one before it";
          }
          last_section = s;
          last_rank = t.rank;
        }
        EXPECT_EQ(static_cast<int>(seen.size()), tiles * heads);
      }
}

TEST(PersistentSchedule, SectionHoldsItsBytes) {
  using cuda::detail::kBackwardSectionBytes;
  using cuda::detail::kForwardSectionBytes;
  // T 2048, D 128, MHA: 1 MB of K and V (forward), of Q and dO (backward) a head
  EXPECT_EQ(persistent_section(1L << 20, 64, kForwardSectionBytes), 8);
  EXPECT_EQ(persistent_section(1L << 20, 64, kBackwardSectionBytes), 16);
  EXPECT_EQ(persistent_section(4L << 20, 128, kForwardSectionBytes), 2);
  EXPECT_EQ(persistent_section(1L << 10, 64, kBackwardSectionBytes), 64);  // at most every head
  EXPECT_EQ(persistent_section(64L << 20, 64, kForwardSectionBytes), 1);   // at least one
  // a degenerate size divides nothing by zero
  EXPECT_EQ(persistent_section(0, 8, kForwardSectionBytes), 8);
}

}  // namespace
}  // namespace dmc
