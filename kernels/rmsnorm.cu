// RMSNorm on the GPU (spec: kernels/rmsnorm.h). One warp per row, fp32 statistics.
// Backward: dinp by one warp per row; dweight deterministically in two passes (fixed row chunks
// into fp32 partials in scratch slot 1, then an in-order sum per column).
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

__global__ void rmsnorm_forward_kernel(bf16* out, float* rstd, const bf16* inp, const bf16* weight,
                                       int N, int C, float eps) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const bf16* x = inp + static_cast<long>(row) * C;
  float ss = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float v = bf(x[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = rsqrtf(ss / C + eps);
  bf16* o = out + static_cast<long>(row) * C;
  for (int c = lane; c < C; c += 32) o[c] = tobf(bf(x[c]) * r * bf(weight[c]));
  if (lane == 0 && rstd) rstd[row] = r;
}

__global__ void rmsnorm_backward_dinp(bf16* dinp, const bf16* dout, const bf16* inp,
                                      const bf16* weight, const float* rstd, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= N) return;
  const long off = static_cast<long>(row) * C;
  float dot = 0.f;
  for (int c = lane; c < C; c += 32) dot += bf(dout[off + c]) * bf(weight[c]) * bf(inp[off + c]);
  dot = warp_sum(dot);
  const float r = rstd[row];
  const float k = r * r * r * dot / C;
  for (int c = lane; c < C; c += 32) {
    const float g = r * bf(weight[c]) * bf(dout[off + c]) - k * bf(inp[off + c]);
    dinp[off + c] = tobf(bf(dinp[off + c]) + g);
  }
}

// partial[chunk, c] = sum over the chunk's rows of dout[n, c] · inp[n, c] · rstd[n]
__global__ void rmsnorm_backward_dweight_partial(float* partial, const bf16* dout, const bf16* inp,
                                                 const float* rstd, int N, int C, int rows_per) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int n0 = blockIdx.y * rows_per, n1 = min(N, n0 + rows_per);
  float acc = 0.f;
  for (int n = n0; n < n1; ++n) {
    const long off = static_cast<long>(n) * C + c;
    acc += bf(dout[off]) * bf(inp[off]) * rstd[n];
  }
  partial[static_cast<long>(blockIdx.y) * C + c] = acc;
}

__global__ void column_sum_accumulate(float* out, const float* partial, int chunks, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  for (int i = 0; i < chunks; ++i) acc += partial[static_cast<long>(i) * C + c];
  out[c] += acc;
}

}  // namespace

void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int N, int C,
                     float eps, cudaStream_t stream) {
  if (N <= 0) return;
  rmsnorm_forward_kernel<<<ceil_div(N, 8), 256, 0, stream>>>(out, rstd, inp, weight, N, C, eps);
  DMC_CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                      const bf16* weight, const float* rstd, int N, int C, cudaStream_t stream) {
  if (N <= 0) return;
  if (dinp) {
    rmsnorm_backward_dinp<<<ceil_div(N, 8), 256, 0, stream>>>(dinp, dout, inp, weight, rstd, N, C);
    DMC_CUDA_CHECK_LAUNCH();
  }
  if (dweight) {
    const int rows_per = 64;
    const int chunks = ceil_div(N, rows_per);
    float* partial = static_cast<float*>(scratch(1, sizeof(float) * chunks * static_cast<size_t>(C)));
    rmsnorm_backward_dweight_partial<<<dim3(ceil_div(C, 128), chunks), 128, 0, stream>>>(
        partial, dout, inp, rstd, N, C, rows_per);
    DMC_CUDA_CHECK_LAUNCH();
    column_sum_accumulate<<<ceil_div(C, 128), 128, 0, stream>>>(dweight, partial, chunks, C);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dmc::cuda
