// Fused softmax + cross-entropy over the vocabulary on the GPU (spec: kernels/cross_entropy.h).
// One block per row: an online max/sum-exp pass (fp32) gives the shard's logsumexp; the shards'
// statistics combine into the losses and the global logsumexp, which the backward reads (no
// recompute) to write dlogits (+)= dloss · (softmax - onehot). 16-byte vectors when V is a
// multiple of 8 (rows stay 16-byte aligned), scalar otherwise.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 512;

__device__ __forceinline__ void online_add(float& m, float& s, float z) {
  if (z > m) {
    s = s * __expf(m - z) + 1.f;
    m = z;
  } else {
    s += __expf(z - m);
  }
}

template <bool kVec>
__device__ float row_logsumexp(const bf16* x, int V) {
  float m = -INFINITY, s = 0.f;
  if (kVec) {
    for (int v = threadIdx.x * 8; v < V; v += blockDim.x * 8) {
      float z[8];
      load8(z, x + v);
      float zm = z[0];
#pragma unroll
      for (int i = 1; i < 8; ++i) zm = fmaxf(zm, z[i]);
      if (zm > m) {
        s *= __expf(m - zm);
        m = zm;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) s += __expf(z[i] - m);
    }
  } else {
    for (int v = threadIdx.x; v < V; v += blockDim.x) online_add(m, s, bf(x[v]));
  }
  const float gm = block_max(m);
  s = (m == -INFINITY) ? 0.f : s * __expf(m - gm);
  s = block_sum(s);
  return gm + logf(s);
}

// stats [2, N]: this shard's logsumexp of row n and the target's logit when this shard holds it.
template <bool kVec>
__global__ void ce_shard_stats_kernel(float* stats, const bf16* logits, const int32_t* targets,
                                      int N, int V, int vocab_begin) {
  const int n = blockIdx.x;
  const int tgt = targets[n];
  if (tgt < 0) {  // no label: both statistics 0, as the CPU reference writes
    if (threadIdx.x == 0) stats[n] = stats[N + n] = 0.f;
    return;
  }
  const bf16* x = logits + static_cast<long>(n) * V;
  const float lse = row_logsumexp<kVec>(x, V);
  if (threadIdx.x == 0) {
    const long t = static_cast<long>(tgt) - vocab_begin;
    stats[n] = lse;
    stats[N + n] = t >= 0 && t < V ? bf(x[t]) : 0.f;
  }
}

__global__ void ce_combine_kernel(float* losses, float* lse, const float* shard_stats,
                                  const int32_t* targets, int N, int shards) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  if (targets[n] < 0) {
    losses[n] = lse[n] = 0.f;
    return;
  }
  float m = -INFINITY, target_logit = 0.f;
  for (int r = 0; r < shards; ++r) {
    m = fmaxf(m, shard_stats[(2L * r) * N + n]);
    target_logit += shard_stats[(2L * r + 1) * N + n];
  }
  float s = 0.f;
  for (int r = 0; r < shards; ++r) s += __expf(shard_stats[(2L * r) * N + n] - m);
  const float total = m + logf(s);
  lse[n] = total;
  losses[n] = total - target_logit;
}

// A row of zeros (no gradient, written when not accumulating).
__device__ void zero_row(bf16* x, int V) {
  for (int v = threadIdx.x; v < V; v += blockDim.x) x[v] = __float2bfloat16(0.f);
}

template <bool kVec>
__global__ void ce_shard_backward_kernel(bf16* dlogits, const bf16* logits, const float* lse,
                                         const int32_t* targets, const float* dlosses, int V,
                                         int vocab_begin, bool accumulate) {
  const int n = blockIdx.x;
  bf16* dx = dlogits + static_cast<long>(n) * V;
  if (targets[n] < 0) {  // no label, no gradient
    if (!accumulate) zero_row(dx, V);
    return;
  }
  const long tgt = static_cast<long>(targets[n]) - vocab_begin;  // outside [0, V): another shard
  const bf16* x = logits + static_cast<long>(n) * V;
  const float row_lse = lse[n], d = dlosses[n];
  if (kVec) {
    for (int v = threadIdx.x * 8; v < V; v += blockDim.x * 8) {
      float z[8], g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      load8(z, x + v);
      if (accumulate) load8(g, dx + v);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[i] += d * (__expf(z[i] - row_lse) - (v + i == tgt ? 1.f : 0.f));
      store8(dx + v, g);
    }
  } else {
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
      const float p = __expf(bf(x[v]) - row_lse);
      const float g = d * (p - (v == tgt ? 1.f : 0.f));
      dx[v] = tobf(accumulate ? bf(dx[v]) + g : g);
    }
  }
}

}  // namespace

void cross_entropy_shard_stats(float* stats, const bf16* logits, const int32_t* targets, int N,
                               int V, int vocab_begin, cudaStream_t stream) {
  if (N <= 0) return;
  if (V % 8 == 0)
    ce_shard_stats_kernel<true><<<N, kThreads, 0, stream>>>(stats, logits, targets, N, V,
                                                            vocab_begin);
  else
    ce_shard_stats_kernel<false><<<N, kThreads, 0, stream>>>(stats, logits, targets, N, V,
                                                             vocab_begin);
  DMC_CUDA_CHECK_LAUNCH();
}

void cross_entropy_combine_shards(float* losses, float* lse, const float* shard_stats,
                                  const int32_t* targets, int N, int shards, cudaStream_t stream) {
  if (N <= 0) return;
  ce_combine_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(losses, lse, shard_stats, targets, N,
                                                          shards);
  DMC_CUDA_CHECK_LAUNCH();
}

void cross_entropy_shard_backward(bf16* dlogits, const bf16* logits, const float* lse,
                                  const int32_t* targets, const float* dlosses, int N, int V,
                                  int vocab_begin, bool accumulate, cudaStream_t stream) {
  if (N <= 0) return;
  if (V % 8 == 0)
    ce_shard_backward_kernel<true><<<N, kThreads, 0, stream>>>(dlogits, logits, lse, targets,
                                                               dlosses, V, vocab_begin, accumulate);
  else
    ce_shard_backward_kernel<false><<<N, kThreads, 0, stream>>>(
        dlogits, logits, lse, targets, dlosses, V, vocab_begin, accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

// The whole vocabulary is one shard: its statistics give the losses and the logsumexp directly.
void cross_entropy_forward(float* losses, const bf16* logits, const int32_t* targets, int N, int V,
                           cudaStream_t stream) {
  if (N <= 0) return;
  float* stats = static_cast<float*>(
      scratch(kScratchCrossEntropyStats, 3 * static_cast<size_t>(N) * sizeof(float)));
  cross_entropy_shard_stats(stats, logits, targets, N, V, 0, stream);
  cross_entropy_combine_shards(losses, stats + 2 * N, stats, targets, N, 1, stream);
}

void cross_entropy_backward(bf16* dlogits, const bf16* logits, const int32_t* targets,
                            const float* dlosses, int N, int V, bool accumulate,
                            cudaStream_t stream) {
  if (N <= 0) return;
  float* stats = static_cast<float*>(
      scratch(kScratchCrossEntropyStats, 2 * static_cast<size_t>(N) * sizeof(float)));
  cross_entropy_shard_stats(stats, logits, targets, N, V, 0, stream);
  // One shard: its logsumexp (stats[0, :]) is the global one.
  cross_entropy_shard_backward(dlogits, logits, stats, targets, dlosses, N, V, 0, accumulate,
                               stream);
}

}  // namespace dmc::cuda
