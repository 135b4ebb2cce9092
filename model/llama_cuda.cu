// Element-wise helpers of the CUDA model (model/llama_cuda.h): the residual add (16-byte vectors
// when n is a multiple of 8 and every buffer 16-byte aligned, scalar otherwise), the labelled
// loss sum, the per-position loss weights, a weighted sum, gradient scaling, the fp32 → bf16
// copy, and the DMS query channel's reads and writes. Declared where they are used
// (model/llama_cuda.cpp), so this file needs no host-only headers.
#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::model::cuda_model_detail {
namespace {
using cuda::bf16;
using namespace dmc::cuda::detail;

constexpr int kThreads = 256;

int Blocks(size_t n) {
  const size_t cap = static_cast<size_t>(num_sms()) * 16;
  size_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > cap) blocks = cap;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

__global__ void add_kernel(bf16* out, const bf16* a, const bf16* b, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = tobf(bf(a[i]) + bf(b[i]));
}

// add_kernel 8 elements (16 bytes) a step: n8 = n / 8, every buffer 16-byte aligned.
__global__ void add_vec(bf16* out, const bf16* a, const bf16* b, size_t n8) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float x[8], y[8];
    load8(x, a + 8 * i);
    load8(y, b + 8 * i);
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] += y[k];
    store8(out + 8 * i, x);
  }
}

__global__ void masked_sum_kernel(float* out, const float* losses, const int32_t* targets, int N) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x)
    if (targets[i] >= 0) acc += static_cast<double>(losses[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(acc);
}

__global__ void weighted_sum_kernel(float* out, const float* x, const float* w, int N) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x)
    acc += static_cast<double>(w[i]) * static_cast<double>(x[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(acc);
}

__global__ void fill_labelled_kernel(float* d, const int32_t* targets, const int32_t* tokens,
                                     int32_t skip_input, int N, float value) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < N) d[i] = targets[i] >= 0 && tokens[i] != skip_input ? value : 0.f;
}

// Channel D-1 of query head h·G of row n (rows ld elements apart), the DMS decision channel of KV
// head h (model/DMS.md §1).
__device__ __forceinline__ long dms_channel(long n, long ld, int h, int G, int D) {
  return n * ld + static_cast<long>(h) * G * D + D - 1;
}

__global__ void get_dms_query_channel_kernel(float* x, const bf16* q, long total, long ld, int H,
                                             int Hkv, int D) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) x[i] = bf(q[dms_channel(i / Hkv, ld, static_cast<int>(i % Hkv), H / Hkv, D)]);
}

__global__ void set_dms_query_channel_kernel(bf16* q, const float* value, long total, long ld,
                                             int H, int Hkv, int D) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total)
    q[dms_channel(i / Hkv, ld, static_cast<int>(i % Hkv), H / Hkv, D)] =
        tobf(value ? value[i] : 0.f);
}

__global__ void scale_kernel(float* x, size_t n, float s) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] *= s;
}

__global__ void to_bf16_kernel(bf16* out, const float* in, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = tobf(in[i]);
}

}  // namespace

void add(bf16* out, const bf16* a, const bf16* b, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (n % 8 == 0 && aligned16(out, a, b))
    add_vec<<<Blocks(n / 8), kThreads, 0, stream>>>(out, a, b, n / 8);
  else
    add_kernel<<<Blocks(n), kThreads, 0, stream>>>(out, a, b, n);
  DMC_CUDA_CHECK_LAUNCH();
}

void masked_sum(float* out, const float* losses, const int32_t* targets, int N,
                cudaStream_t stream) {
  masked_sum_kernel<<<1, 1024, 0, stream>>>(out, losses, targets, N);
  DMC_CUDA_CHECK_LAUNCH();
}

void weighted_sum(float* out, const float* x, const float* w, int N, cudaStream_t stream) {
  weighted_sum_kernel<<<1, 1024, 0, stream>>>(out, x, w, N);
  DMC_CUDA_CHECK_LAUNCH();
}

void fill_labelled(float* d, const int32_t* targets, const int32_t* tokens, int32_t skip_input,
                   int N, float value, cudaStream_t stream) {
  if (N <= 0) return;
  fill_labelled_kernel<<<ceil_div(N, kThreads), kThreads, 0, stream>>>(d, targets, tokens,
                                                                      skip_input, N, value);
  DMC_CUDA_CHECK_LAUNCH();
}

void get_dms_query_channel(float* x, const bf16* q, long N, int H, int Hkv, int D,
                           cudaStream_t stream, long row_stride) {
  const long total = N * Hkv;
  if (total <= 0) return;
  const long ld = row_stride_or(row_stride, static_cast<long>(H) * D);
  get_dms_query_channel_kernel<<<ceil_div(total, kThreads), kThreads, 0, stream>>>(x, q, total, ld,
                                                                                  H, Hkv, D);
  DMC_CUDA_CHECK_LAUNCH();
}

void set_dms_query_channel(bf16* q, const float* value, long N, int H, int Hkv, int D,
                           cudaStream_t stream, long row_stride) {
  const long total = N * Hkv;
  if (total <= 0) return;
  const long ld = row_stride_or(row_stride, static_cast<long>(H) * D);
  set_dms_query_channel_kernel<<<ceil_div(total, kThreads), kThreads, 0, stream>>>(
      q, value, total, ld, H, Hkv, D);
  DMC_CUDA_CHECK_LAUNCH();
}

void scale(float* x, size_t n, float s, cudaStream_t stream) {
  if (n == 0) return;
  scale_kernel<<<Blocks(n), kThreads, 0, stream>>>(x, n, s);
  DMC_CUDA_CHECK_LAUNCH();
}

void to_bf16(bf16* out, const float* in, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  to_bf16_kernel<<<Blocks(n), kThreads, 0, stream>>>(out, in, n);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::model::cuda_model_detail
