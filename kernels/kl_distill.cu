// KL(student || teacher) distillation over a vocabulary shard on the GPU (spec:
// kernels/kl_distill.h). One block per row, as the cross-entropy: the global logsumexps of both
// rows come in (the cross-entropy combine computed them), so each pass reads the shard's logits
// once, fp32 arithmetic on bf16 logits. 16-byte vectors when V is a multiple of 8 (rows stay
// 16-byte aligned), scalar otherwise. Rows of weight 0 are skipped: partial 0, no gradient.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 512;

// p (log p - log p_t) of one vocabulary entry, from the two logits and their row's logsumexps.
__device__ __forceinline__ float kl_term(float s, float u, float lse_s, float lse_u) {
  const float log_p = s - lse_s;
  return expf(log_p) * (log_p - (u - lse_u));
}

template <bool kVec>
__global__ void kl_shard_kernel(float* partial, const bf16* s, const bf16* u, const float* lse_s,
                                const float* lse_u, const float* weight, int V) {
  const int n = blockIdx.x;
  if (weight[n] == 0.f) {
    if (threadIdx.x == 0) partial[n] = 0.f;
    return;
  }
  const bf16* sn = s + static_cast<long>(n) * V;
  const bf16* un = u + static_cast<long>(n) * V;
  const float ls = lse_s[n], lu = lse_u[n];
  float sum = 0.f;
  if (kVec) {
    for (int v = threadIdx.x * 8; v < V; v += blockDim.x * 8) {
      float zs[8], zu[8];
      load8(zs, sn + v);
      load8(zu, un + v);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += kl_term(zs[i], zu[i], ls, lu);
    }
  } else {
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += kl_term(bf(sn[v]), bf(un[v]), ls, lu);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[n] = sum;
}

template <bool kVec>
__global__ void kl_shard_backward_kernel(bf16* ds, const bf16* s, const bf16* u,
                                         const float* lse_s, const float* lse_u, const float* kl,
                                         const float* weight, float dloss, int V,
                                         bool accumulate) {
  const int n = blockIdx.x;
  bf16* dn = ds + static_cast<long>(n) * V;
  if (weight[n] == 0.f) {  // no gradient: a row of zeros when not accumulating
    if (!accumulate)
      for (int v = threadIdx.x; v < V; v += blockDim.x) dn[v] = __float2bfloat16(0.f);
    return;
  }
  const bf16* sn = s + static_cast<long>(n) * V;
  const bf16* un = u + static_cast<long>(n) * V;
  const float ls = lse_s[n], lu = lse_u[n], row_kl = kl[n], g = dloss * weight[n];
  auto grad = [&](float zs, float zu) {
    const float log_p = zs - ls;
    return g * expf(log_p) * (log_p - (zu - lu) - row_kl);
  };
  if (kVec) {
    for (int v = threadIdx.x * 8; v < V; v += blockDim.x * 8) {
      float zs[8], zu[8], d[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      load8(zs, sn + v);
      load8(zu, un + v);
      if (accumulate) load8(d, dn + v);
#pragma unroll
      for (int i = 0; i < 8; ++i) d[i] += grad(zs[i], zu[i]);
      store8(dn + v, d);
    }
  } else {
    for (int v = threadIdx.x; v < V; v += blockDim.x)
      dn[v] = tobf((accumulate ? bf(dn[v]) : 0.f) + grad(bf(sn[v]), bf(un[v])));
  }
}

}  // namespace

void kl_distill_shard(float* partial, const bf16* s, const bf16* u, const float* lse_s,
                      const float* lse_u, const float* weight, int N, int V,
                      cudaStream_t stream) {
  if (N <= 0) return;
  if (V % 8 == 0)
    kl_shard_kernel<true><<<N, kThreads, 0, stream>>>(partial, s, u, lse_s, lse_u, weight, V);
  else
    kl_shard_kernel<false><<<N, kThreads, 0, stream>>>(partial, s, u, lse_s, lse_u, weight, V);
  DMC_CUDA_CHECK_LAUNCH();
}

void kl_distill_shard_backward(bf16* ds, const bf16* s, const bf16* u, const float* lse_s,
                               const float* lse_u, const float* kl, const float* weight,
                               float dloss, int N, int V, bool accumulate,
                               cudaStream_t stream) {
  if (N <= 0) return;
  if (V % 8 == 0)
    kl_shard_backward_kernel<true><<<N, kThreads, 0, stream>>>(ds, s, u, lse_s, lse_u, kl, weight,
                                                               dloss, V, accumulate);
  else
    kl_shard_backward_kernel<false><<<N, kThreads, 0, stream>>>(ds, s, u, lse_s, lse_u, kl, weight,
                                                                dloss, V, accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
