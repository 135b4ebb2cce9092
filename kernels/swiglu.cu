// SwiGLU on the GPU (spec: kernels/swiglu.h), elementwise, fp32 arithmetic.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

__global__ void swiglu_forward_kernel(bf16* out, const bf16* gate, const bf16* up, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = bf(gate[i]);
    const float sg = 1.f / (1.f + expf(-g));
    out[i] = tobf(g * sg * bf(up[i]));
  }
}

__global__ void swiglu_backward_kernel(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate,
                                       const bf16* up, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = bf(gate[i]), u = bf(up[i]), d = bf(dout[i]);
    const float sg = 1.f / (1.f + expf(-g));
    const float silu = g * sg;
    const float dsilu = sg * (1.f + g * (1.f - sg));
    if (dgate) dgate[i] = tobf(bf(dgate[i]) + d * u * dsilu);
    if (dup) dup[i] = tobf(bf(dup[i]) + d * silu);
  }
}

int grid_for(size_t n) {
  const size_t blocks = (n + 255) / 256;
  const size_t cap = static_cast<size_t>(num_sms()) * 16;
  return static_cast<int>(blocks < cap ? blocks : cap);
}

}  // namespace

void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  swiglu_forward_kernel<<<grid_for(n), 256, 0, stream>>>(out, gate, up, n);
  DMC_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     size_t n, cudaStream_t stream) {
  if (n == 0) return;
  swiglu_backward_kernel<<<grid_for(n), 256, 0, stream>>>(dgate, dup, dout, gate, up, n);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
