// Token choice on the GPU (spec: kernels/sample.h): one CTA of 1024 threads per row, fp32 logits.
// The nucleus threshold tau is found without sorting: the mass of {p_v >= tau} falls as tau rises
// and changes only at the p values, so a binary search over the bit patterns of non-negative
// floats (ordered as the floats are) ends exactly on the largest p_u that keeps top_p of the mass.
// 31 passes over the row, each a block reduction. The inverse CDF in id order is a block scan
// (CUB) over tiles of 1024 tokens. Greedy rows skip both.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "kernels/sample.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 1024;

struct ArgMax {
  float value;
  int32_t index;
};
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  }
};

__global__ void sample_kernel(int32_t* next, float* logprob, int32_t* argmax, const float* logits,
                              int V, kernels::SampleRows rows) {
  producer_done();
  using Reduce = cub::BlockReduce<ArgMax, kThreads>;
  using Scan = cub::BlockScan<float, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ ArgMax best_shared;
  __shared__ int32_t chosen_shared;
  const int i = blockIdx.x;
  const float* l = logits + static_cast<long>(i) * V;

  ArgMax mine{-INFINITY, V};
  for (int v = threadIdx.x; v < V; v += kThreads) mine = ArgMaxOp()(mine, ArgMax{l[v], v});
  const ArgMax best = Reduce(tmp.reduce).Reduce(mine, ArgMaxOp());
  if (threadIdx.x == 0) {
    best_shared = best;
    chosen_shared = best.index;
  }
  __syncthreads();
  const float max_l = best_shared.value;
  const float temperature = rows.temperature[i];

  if (temperature > 0.f) {
    const float inv_t = 1.f / temperature;
    auto prob = [&](int v) { return expf((l[v] - max_l) * inv_t); };
    auto mass_above = [&](float tau) {  // sum of p_v >= tau, on every thread
      float s = 0.f;
      for (int v = threadIdx.x; v < V; v += kThreads) {
        const float p = prob(v);
        s += p >= tau ? p : 0.f;
      }
      return block_sum(s);
    };
    const float want = rows.top_p[i] * mass_above(0.f);
    // Largest bit pattern b in [0, bits(1)] with mass_above(b) >= want; p_max = 1 qualifies.
    uint32_t lo = 0, hi = __float_as_uint(1.f);
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo + 1) / 2;
      if (mass_above(__uint_as_float(mid)) >= want)
        lo = mid;
      else
        hi = mid - 1;
    }
    const float tau = __uint_as_float(lo);
    const float cut = kernels::SampleUniform(rows.seed[i], rows.position[i]) * mass_above(tau);
    float running = 0.f;
    int32_t found = -1, last_in = -1;
    for (int base = 0; base < V && found < 0; base += kThreads) {
      const int v = base + threadIdx.x;
      const float p = v < V ? prob(v) : 0.f;
      const float x = v < V && p >= tau ? p : 0.f;
      float inclusive, tile;
      Scan(tmp.scan).InclusiveSum(x, inclusive, tile);
      __shared__ int32_t tile_found, tile_last;
      if (threadIdx.x == 0) tile_found = tile_last = -1;
      __syncthreads();
      if (x > 0.f && running + inclusive > cut) atomicMin(reinterpret_cast<unsigned*>(&tile_found), v);
      if (x > 0.f) atomicMax(&tile_last, v);
      __syncthreads();
      found = tile_found;  // -1 as unsigned is the largest value, so atomicMin finds the lowest v
      if (tile_last >= 0) last_in = tile_last;
      running += tile;
      __syncthreads();
    }
    if (threadIdx.x == 0) chosen_shared = found >= 0 ? found : last_in;
    __syncthreads();
  }

  const int32_t chosen = chosen_shared;
  if (logprob) {
    float s = 0.f;
    for (int v = threadIdx.x; v < V; v += kThreads) s += expf(l[v] - max_l);
    s = block_sum(s);
    if (threadIdx.x == 0) {
      const int32_t t = rows.target && rows.target[i] >= 0 ? rows.target[i] : chosen;
      logprob[i] = l[t] - max_l - logf(s);
    }
  }
  if (threadIdx.x == 0) {
    if (next) next[i] = chosen;
    if (argmax) argmax[i] = best_shared.index;
  }
}

__global__ void take_previous_choices_kernel(int32_t* tokens, const int32_t* previous, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && tokens[i] < 0) tokens[i] = previous[i];
}

}  // namespace

void take_previous_choices(int32_t* tokens, const int32_t* previous, int n, cudaStream_t stream) {
  if (n <= 0) return;
  take_previous_choices_kernel<<<(n + 255) / 256, 256, 0, stream>>>(tokens, previous, n);
}

void sample_tokens(int32_t* next, float* logprob, int32_t* argmax, const float* logits, int n,
                   int V, const kernels::SampleRows& rows, cudaStream_t stream) {
  if (n <= 0) return;
  launch_dependent(sample_kernel, n, kThreads, 0, stream, next, logprob, argmax, logits, V, rows);
}

}  // namespace dmc::cuda
