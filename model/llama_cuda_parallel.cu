// The bf16 → fp32 copy that the tensor-parallel all-reduce of bf16 partial sums starts with
// (model/llama_cuda_parallel.cpp). Declared where it is used, so this file needs no host-only
// headers.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::model::cuda_model_detail {
namespace {
using cuda::bf16;
using namespace dmc::cuda::detail;

constexpr int kThreads = 256;

__global__ void to_f32_kernel(float* out, const bf16* in, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = bf(in[i]);
}

}  // namespace

void to_f32(float* out, const bf16* in, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  const size_t cap = static_cast<size_t>(num_sms()) * 16;
  const size_t blocks = (n + kThreads - 1) / kThreads;
  to_f32_kernel<<<static_cast<int>(blocks < cap ? blocks : cap), kThreads, 0, stream>>>(out, in, n);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::model::cuda_model_detail
