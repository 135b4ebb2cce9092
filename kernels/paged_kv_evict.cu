// Eviction by attention on the GPU (spec: kernels/paged_kv_evict.h).
// H2O:  one CTA per (row, KV head): its threads accumulate the group's weights into the slots'
//       scores (each thread a slot, the query heads summed in order), then, while the head is
//       over budget, find the lowest evictable slot with a block reduction and move the last slot
//       into it.
// TOVA: one CTA per row: while the layer is over budget, its threads compute every slot's mean
//       weight over all query heads (each thread a slot, heads in order), a block reduction finds
//       the lowest, and the CTA moves the last slot into it in every KV head.
// The reductions order candidates by (score, position), a total order (positions are distinct),
// so the chosen slot does not depend on the order in which threads meet: deterministic, and the
// same slot as the CPU reference on the same weights.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 256;

template <typename K>
struct Candidate {
  K score;
  int pos;
  int slot;  // -1: none
};

template <typename K>
__device__ __forceinline__ bool lower(const Candidate<K>& a, const Candidate<K>& b) {
  if (a.slot < 0) return false;
  if (b.slot < 0) return true;
  return a.score < b.score || (a.score == b.score && a.pos < b.pos);
}

// The lowest candidate over the CTA, returned to every thread.
template <typename K>
__device__ Candidate<K> block_lowest(Candidate<K> c) {
  __shared__ Candidate<K> warp_lowest[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto warp_reduce = [](Candidate<K> x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const Candidate<K> y{__shfl_xor_sync(0xffffffffu, x.score, o),
                           __shfl_xor_sync(0xffffffffu, x.pos, o),
                           __shfl_xor_sync(0xffffffffu, x.slot, o)};
      if (lower(y, x)) x = y;
    }
    return x;
  };
  c = warp_reduce(c);
  if (lane == 0) warp_lowest[warp] = c;
  __syncthreads();
  if (warp == 0) {
    c = lane < kThreads / 32 ? warp_lowest[lane] : Candidate<K>{K(0), 0, -1};
    c = warp_reduce(c);
    if (lane == 0) warp_lowest[0] = c;
  }
  __syncthreads();
  c = warp_lowest[0];
  __syncthreads();  // warp_lowest is rewritten by the next call
  return c;
}

// Moves the last slot (index last) of `head` into `slot`: rows, position and score.
__device__ void move_last_into(const PagedKv& c, float* scores, long head, int slot, int last,
                               int D) {
  if (slot == last) return;
  kernels::MoveSlot(c, scores, kernels::SlotRow(c, head, slot), kernels::SlotRow(c, head, last), D,
                    threadIdx.x, blockDim.x);
}

__global__ void __launch_bounds__(kThreads)
    h2o_kernel(PagedKv c, float* scores, const float* probs, int stride, const int32_t* positions,
               int H, int Hkv, int D, int budget, int recent) {
  const long head = blockIdx.x;  // i · Hkv + h
  const int i = static_cast<int>(head / Hkv), h = static_cast<int>(head % Hkv), G = H / Hkv;
  const int t = positions[i];
  const float* p = probs + (static_cast<long>(i) * H + static_cast<long>(h) * G) * stride;
  const int held = c.lengths[head];
  int len = held;
  for (int s = threadIdx.x; s < len; s += blockDim.x) {
    const long r = kernels::SlotRow(c, head, s);
    float acc = c.slot_pos[r] == t ? 0.f : scores[r];
    for (int g = 0; g < G; ++g) acc += p[static_cast<long>(g) * stride + s];
    scores[r] = acc;
  }
  __syncthreads();
  while (len > budget) {
    Candidate<float> best{0.f, 0, -1};
    for (int s = threadIdx.x; s < len; s += blockDim.x) {
      const long r = kernels::SlotRow(c, head, s);
      const Candidate<float> x{scores[r], c.slot_pos[r], s};
      if (x.pos <= t - recent && lower(x, best)) best = x;
    }
    best = block_lowest(best);
    if (best.slot < 0) break;  // only when recent >= budget, which the engines refuse
    move_last_into(c, scores, head, best.slot, len - 1, D);
    --len;
    __syncthreads();  // the move is complete before the next search reads the slots
  }
  // Written only after an eviction, so never while another thread still reads the old length.
  if (threadIdx.x == 0 && len != held) c.lengths[head] = len;
}

__global__ void __launch_bounds__(kThreads)
    tova_kernel(PagedKv c, float* probs, int stride, int H, int Hkv, int D, int budget) {
  const int i = blockIdx.x;
  const long head0 = static_cast<long>(i) * Hkv;
  float* p = probs + static_cast<long>(i) * H * stride;
  const int held = c.lengths[head0];
  int len = held;
  while (len > budget) {
    Candidate<double> best{0.0, 0, -1};
    for (int s = threadIdx.x; s < len; s += blockDim.x) {
      double mean = 0;
      for (int g = 0; g < H; ++g) mean += p[static_cast<long>(g) * stride + s] / H;
      const Candidate<double> x{mean, c.slot_pos[kernels::SlotRow(c, head0, s)], s};
      if (lower(x, best)) best = x;
    }
    best = block_lowest(best);
    const int last = len - 1;
    if (best.slot != last) {
      for (int g = threadIdx.x; g < H; g += blockDim.x)
        p[static_cast<long>(g) * stride + best.slot] = p[static_cast<long>(g) * stride + last];
      for (int h = 0; h < Hkv; ++h) move_last_into(c, nullptr, head0 + h, best.slot, last, D);
    }
    --len;
    __syncthreads();
  }
  if (len != held)
    for (int h = threadIdx.x; h < Hkv; h += blockDim.x) c.lengths[head0 + h] = len;
}

}  // namespace

void paged_kv_evict(const PagedKv& cache, float* scores, float* probs, int probs_stride,
                    const int32_t* positions, int n, int H, int Hkv, int D,
                    const kernels::EvictPolicy& policy, cudaStream_t stream) {
  if (n <= 0) return;
  if (policy.rule == kernels::EvictRule::kH2O) {
    h2o_kernel<<<n * Hkv, kThreads, 0, stream>>>(cache, scores, probs, probs_stride, positions, H,
                                                 Hkv, D, policy.budget, policy.recent);
  } else {
    tova_kernel<<<n, kThreads, 0, stream>>>(cache, probs, probs_stride, H, Hkv, D, policy.budget);
  }
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
