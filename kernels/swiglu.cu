// SwiGLU on the GPU (spec: kernels/swiglu.h), elementwise, fp32 arithmetic; 16-byte vectors when
// F and ld are multiples of 8 and every buffer is 16-byte aligned (scalar otherwise). Element
// (r, f) of out and dout is at r·F + f, of gate, up, dgate and dup at r·ld + f.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// body(i) for i in [0, n), grid-stride: the elements (or 8-element vectors) of rows × F.
template <class Body>
__device__ __forceinline__ void grid_stride(size_t n, Body body) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    body(i);
}

__global__ void swiglu_forward_kernel(bf16* out, const bf16* gate, const bf16* up, size_t rows,
                                      size_t F, size_t ld) {
  producer_done();
  grid_stride(rows * F, [&](size_t i) {
    const size_t in = (i / F) * ld + i % F;
    const float g = bf(gate[in]);
    const float sg = 1.f / (1.f + expf(-g));
    out[i] = tobf(g * sg * bf(up[in]));
  });
}

__global__ void swiglu_backward_kernel(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate,
                                       const bf16* up, size_t rows, size_t F, size_t ld,
                                       bool accumulate) {
  grid_stride(rows * F, [&](size_t i) {
    const size_t in = (i / F) * ld + i % F;
    const float g = bf(gate[in]), u = bf(up[in]), d = bf(dout[i]);
    const float sg = 1.f / (1.f + expf(-g));
    const float silu = g * sg;
    const float dsilu = sg * (1.f + g * (1.f - sg));
    if (dgate) dgate[in] = tobf((accumulate ? bf(dgate[in]) : 0.f) + d * u * dsilu);
    if (dup) dup[in] = tobf((accumulate ? bf(dup[in]) : 0.f) + d * silu);
  });
}

// F8 = F / 8 vectors a row, ld8 = ld / 8.
__global__ void swiglu_forward_vec(bf16* out, const bf16* gate, const bf16* up, size_t rows,
                                   size_t F8, size_t ld8) {
  producer_done();
  grid_stride(rows * F8, [&](size_t i) {
    const size_t in = 8 * ((i / F8) * ld8 + i % F8);
    float g[8], u[8];
    load8(g, gate + in);
    load8(u, up + in);
#pragma unroll
    for (int k = 0; k < 8; ++k) g[k] = g[k] / (1.f + __expf(-g[k])) * u[k];
    store8(out + 8 * i, g);
  });
}

__global__ void swiglu_backward_vec(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate,
                                    const bf16* up, size_t rows, size_t F8, size_t ld8,
                                    bool accumulate) {
  grid_stride(rows * F8, [&](size_t i) {
    const size_t in = 8 * ((i / F8) * ld8 + i % F8);
    float g[8], u[8], d[8], a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    load8(g, gate + in);
    load8(u, up + in);
    load8(d, dout + 8 * i);
    if (dgate && accumulate) load8(a, dgate + in);
    if (dup && accumulate) load8(b, dup + in);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float sg = 1.f / (1.f + __expf(-g[k]));
      a[k] += d[k] * u[k] * sg * (1.f + g[k] * (1.f - sg));
      b[k] += d[k] * g[k] * sg;
    }
    if (dgate) store8(dgate + in, a);
    if (dup) store8(dup + in, b);
  });
}

int grid_for(size_t n) {
  const size_t blocks = (n + 255) / 256;
  const size_t cap = static_cast<size_t>(num_sms()) * 16;
  return static_cast<int>(blocks < cap ? blocks : cap);
}

}  // namespace

void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, size_t rows, size_t F, size_t ld,
                    cudaStream_t stream) {
  if (rows == 0 || F == 0) return;
  if (F % 8 == 0 && ld % 8 == 0 && aligned16(out, gate, up))
    launch_dependent(swiglu_forward_vec, grid_for(rows * F / 8), 256, 0, stream, out, gate, up,
                     rows, F / 8, ld / 8);
  else
    launch_dependent(swiglu_forward_kernel, grid_for(rows * F), 256, 0, stream, out, gate, up, rows,
                     F, ld);
}

void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     size_t rows, size_t F, size_t ld, bool accumulate, cudaStream_t stream) {
  if (rows == 0 || F == 0) return;
  if (F % 8 == 0 && ld % 8 == 0 && aligned16(dgate, dup, dout, gate, up))
    swiglu_backward_vec<<<grid_for(rows * F / 8), 256, 0, stream>>>(dgate, dup, dout, gate, up,
                                                                    rows, F / 8, ld / 8,
                                                                    accumulate);
  else
    swiglu_backward_kernel<<<grid_for(rows * F), 256, 0, stream>>>(dgate, dup, dout, gate, up,
                                                                   rows, F, ld, accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
