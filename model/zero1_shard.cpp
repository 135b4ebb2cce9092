#include "model/zero1_shard.h"

#include <algorithm>

#include "model/llama.h"

namespace dmc::model {

Zero1Shard Zero1Shard::Make(size_t n, int rank, int ranks) {
  const int64_t blocks = static_cast<int64_t>((n + kZero1Align - 1) / kZero1Align);
  Zero1Shard shard;
  for (int r = 0; r < ranks; ++r) {
    const TpSlice b = TpShard(blocks, r, ranks);
    const size_t begin = std::min(n, static_cast<size_t>(b.begin) * kZero1Align);
    const size_t end = std::min(n, static_cast<size_t>(b.begin + b.size) * kZero1Align);
    shard.counts.push_back(end - begin);
    if (r == rank) shard.slice = {begin, end - begin};
  }
  return shard;
}

FlatRange Zero1Shard::Overlap(size_t offset, size_t size) const {
  const size_t begin = std::max(offset, slice.begin), end = std::min(offset + size, slice.end());
  return end > begin ? FlatRange{begin, end - begin} : FlatRange{begin, 0};
}

}  // namespace dmc::model
