// SwiGLU on the GPU (spec: kernels/swiglu.h), elementwise, fp32 arithmetic; 16-byte vectors when
// n is a multiple of 8 and every buffer is 16-byte aligned (scalar otherwise).
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
                                       const bf16* up, size_t n, bool accumulate) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = bf(gate[i]), u = bf(up[i]), d = bf(dout[i]);
    const float sg = 1.f / (1.f + expf(-g));
    const float silu = g * sg;
    const float dsilu = sg * (1.f + g * (1.f - sg));
    if (dgate) dgate[i] = tobf((accumulate ? bf(dgate[i]) : 0.f) + d * u * dsilu);
    if (dup) dup[i] = tobf((accumulate ? bf(dup[i]) : 0.f) + d * silu);
  }
}

__device__ __forceinline__ void swiglu_fwd8(bf16* out, const bf16* gate, const bf16* up) {
  float g[8], u[8];
  load8(g, gate);
  load8(u, up);
#pragma unroll
  for (int i = 0; i < 8; ++i) g[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
  store8(out, g);
}

__global__ void swiglu_forward_vec(bf16* out, const bf16* gate, const bf16* up, size_t n8) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    swiglu_fwd8(out + 8 * i, gate + 8 * i, up + 8 * i);
}

__global__ void swiglu_backward_vec(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate,
                                    const bf16* up, size_t n8, bool accumulate) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t o = 8 * i;
    float g[8], u[8], d[8], a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    load8(g, gate + o);
    load8(u, up + o);
    load8(d, dout + o);
    if (dgate && accumulate) load8(a, dgate + o);
    if (dup && accumulate) load8(b, dup + o);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float sg = 1.f / (1.f + __expf(-g[k]));
      a[k] += d[k] * u[k] * sg * (1.f + g[k] * (1.f - sg));
      b[k] += d[k] * g[k] * sg;
    }
    if (dgate) store8(dgate + o, a);
    if (dup) store8(dup + o, b);
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
  if (n % 8 == 0 && aligned16(out, gate, up))
    swiglu_forward_vec<<<grid_for(n / 8), 256, 0, stream>>>(out, gate, up, n / 8);
  else
    swiglu_forward_kernel<<<grid_for(n), 256, 0, stream>>>(out, gate, up, n);
  DMC_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     size_t n, bool accumulate, cudaStream_t stream) {
  if (n == 0) return;
  if (n % 8 == 0 && aligned16(dgate, dup, dout, gate, up))
    swiglu_backward_vec<<<grid_for(n / 8), 256, 0, stream>>>(dgate, dup, dout, gate, up, n / 8,
                                                             accumulate);
  else
    swiglu_backward_kernel<<<grid_for(n), 256, 0, stream>>>(dgate, dup, dout, gate, up, n,
                                                            accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
