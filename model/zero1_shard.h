// ZeRO-1 (Megatron-LM's distributed optimizer, stage 1): the AdamW moments sharded over the
// data-parallel group.
//
// Every DP replica holds the same flat parameter buffer (its TP rank's shard, n values in the
// layout of param_specs()) and, after the gradient all-reduce, the same gradients. Without ZeRO-1
// each replica keeps the moments m and v of all n values and applies the same update. With it, DP
// rank r of d keeps m and v only for its slice of the flat buffer, updates only the parameters of
// that slice (each tensor's part inside it, with that tensor's weight decay), and an all-gather
// of the slices over the DP group (Communicator::AllGatherUneven) gives every replica the whole
// updated buffer again. Moments then take 2n/d floats per rank instead of 2n.
//
// The slices: the buffer is cut into blocks of kZero1Align values (the last one may be shorter)
// and the blocks are split as model::TpShard splits rows: contiguous, in rank order, the first
// (blocks % d) ranks one block more. So any n splits over any d (a rank may get nothing when n is
// tiny), slices cross tensor boundaries freely, and every non-empty slice starts on a multiple of 4
// values: the GPU's vectorised AdamW then sees a 16-byte-aligned sub-buffer, exactly like a smaller
// model's flat buffer.
//
// The gradient norm (hence the clipping) is still computed from the whole all-reduced gradient, so
// every element goes through exactly the arithmetic of the unsharded step: ZeRO-1 changes no bit of
// the weights or moments. Gradients are all-reduced as without ZeRO-1; a reduce-scatter to the
// slices would halve that traffic, but the norm needs every gradient, and the all-reduce keeps one
// code path (and the GPU's bucketed reduction overlapped with the backward pass) for both modes.
//
// Checkpoints hold the full moments of each TP rank, as without ZeRO-1 (trainer/checkpoint.h): a
// save gathers the slices, a load keeps this rank's slice of the full moments, so a run resumes at
// another DP size or with ZeRO-1 switched on or off.
#pragma once

#include <cstddef>
#include <vector>

namespace dmc::model {

constexpr size_t kZero1Align = 4;

// [begin, begin + size) of a flat buffer.
struct FlatRange {
  size_t begin = 0, size = 0;
  size_t end() const { return begin + size; }
};

struct Zero1Shard {
  FlatRange slice;             // what this rank keeps moments for and updates
  std::vector<size_t> counts;  // every rank's slice size, in rank order (AllGatherUneven)

  // DP rank `rank` of `ranks` over a buffer of n values; ranks == 1: the whole buffer.
  static Zero1Shard Make(size_t n, int rank, int ranks);
  // The part of [offset, offset + size) inside the slice (size 0 when they do not meet).
  FlatRange Overlap(size_t offset, size_t size) const;
};

}  // namespace dmc::model
