// AdamW on fp32 master weights (spec: kernels/adamw.h) and the deterministic sum of squares
// (spec: kernels/grad_norm.h) on the GPU.
#include <cmath>
#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, size_t n,
                             float lr, float b1, float b2, float eps, float wd, float bc1,
                             float bc2, float grad_scale, bf16* param_bf16) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = grad[i] * grad_scale;
    const float mi = b1 * m[i] + (1.f - b1) * g;
    const float vi = b2 * v[i] + (1.f - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float mhat = mi / bc1, vhat = vi / bc2;
    float p = param[i];
    p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
    param[i] = p;
    if (param_bf16) param_bf16[i] = tobf(p);
  }
}

// Fixed grid (not derived from the device), so the summation order, hence the result, is the same
// on every GPU.
constexpr int kSsqBlocks = 1024, kSsqThreads = 256;

__global__ void ssq_partial(double* partial, const float* x, size_t n) {
  double acc = 0.0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    const size_t n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (size_t i = tid; i < n4; i += stride) {
      const float4 v = x4[i];
      acc += static_cast<double>(v.x) * v.x + static_cast<double>(v.y) * v.y +
             static_cast<double>(v.z) * v.z + static_cast<double>(v.w) * v.w;
    }
    for (size_t i = 4 * n4 + tid; i < n; i += stride) acc += static_cast<double>(x[i]) * x[i];
  } else {
    for (size_t i = tid; i < n; i += stride) acc += static_cast<double>(x[i]) * x[i];
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void ssq_final(double* out, const double* partial, int nparts) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out += acc;
}

}  // namespace

void adamw_update(float* param, const float* grad, float* m, float* v, size_t n,
                  const kernels::AdamWHyper& h, float grad_scale, bf16* param_bf16,
                  cudaStream_t stream) {
  if (n == 0) return;
  const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(h.beta1), h.step));
  const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(h.beta2), h.step));
  size_t blocks = (n + 255) / 256;
  const size_t cap = static_cast<size_t>(num_sms()) * 16;
  if (blocks > cap) blocks = cap;
  adamw_kernel<<<static_cast<int>(blocks), 256, 0, stream>>>(param, grad, m, v, n, h.lr, h.beta1,
                                                             h.beta2, h.eps, h.weight_decay, bc1,
                                                             bc2, grad_scale, param_bf16);
  DMC_CUDA_CHECK_LAUNCH();
}

void sum_of_squares_accumulate(double* out, const float* x, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  double* partial = static_cast<double*>(scratch(2, sizeof(double) * kSsqBlocks));
  ssq_partial<<<kSsqBlocks, kSsqThreads, 0, stream>>>(partial, x, n);
  DMC_CUDA_CHECK_LAUNCH();
  ssq_final<<<1, kSsqThreads, 0, stream>>>(out, partial, kSsqBlocks);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
