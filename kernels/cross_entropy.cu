// Fused softmax + cross-entropy over the vocabulary on the GPU (spec: kernels/cross_entropy.h).
// One block per row: an online max/sum-exp pass (fp32) gives logsumexp; the backward recomputes it
// and writes dlogits += dloss · (softmax - onehot) in a second pass. 16-byte vectors when V is a
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

template <bool kVec>
__global__ void ce_forward_kernel(float* losses, const bf16* logits, const int32_t* targets, int V) {
  const int n = blockIdx.x;
  const bf16* x = logits + static_cast<long>(n) * V;
  const float lse = row_logsumexp<kVec>(x, V);
  if (threadIdx.x == 0) {
    const int tgt = targets[n];
    losses[n] = tgt < 0 ? 0.f : lse - bf(x[tgt]);
  }
}

template <bool kVec>
__global__ void ce_backward_kernel(bf16* dlogits, const bf16* logits, const int32_t* targets,
                                   const float* dlosses, int V) {
  const int n = blockIdx.x;
  const int tgt = targets[n];
  if (tgt < 0) return;  // no label, no gradient
  const bf16* x = logits + static_cast<long>(n) * V;
  const float lse = row_logsumexp<kVec>(x, V);
  const float d = dlosses[n];
  bf16* dx = dlogits + static_cast<long>(n) * V;
  if (kVec) {
    for (int v = threadIdx.x * 8; v < V; v += blockDim.x * 8) {
      float z[8], g[8];
      load8(z, x + v);
      load8(g, dx + v);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[i] += d * (__expf(z[i] - lse) - (v + i == tgt ? 1.f : 0.f));
      store8(dx + v, g);
    }
  } else {
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
      const float p = __expf(bf(x[v]) - lse);
      const float g = d * (p - (v == tgt ? 1.f : 0.f));
      dx[v] = tobf(bf(dx[v]) + g);
    }
  }
}

}  // namespace

void cross_entropy_forward(float* losses, const bf16* logits, const int32_t* targets, int N, int V,
                           cudaStream_t stream) {
  if (N <= 0) return;
  if (V % 8 == 0)
    ce_forward_kernel<true><<<N, kThreads, 0, stream>>>(losses, logits, targets, V);
  else
    ce_forward_kernel<false><<<N, kThreads, 0, stream>>>(losses, logits, targets, V);
  DMC_CUDA_CHECK_LAUNCH();
}

void cross_entropy_backward(bf16* dlogits, const bf16* logits, const int32_t* targets,
                            const float* dlosses, int N, int V, cudaStream_t stream) {
  if (N <= 0) return;
  if (V % 8 == 0)
    ce_backward_kernel<true><<<N, kThreads, 0, stream>>>(dlogits, logits, targets, dlosses, V);
  else
    ce_backward_kernel<false><<<N, kThreads, 0, stream>>>(dlogits, logits, targets, dlosses, V);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
