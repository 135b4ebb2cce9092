// Stage-1 fading of the control channel on the GPU (spec: kernels/control_channel.h).
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

__global__ void scale_last_channel_kernel(bf16* x, long rows, int D, float m) {
  const long r = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) {
    bf16* e = x + r * D + D - 1;
    *e = tobf(bf(*e) * m);
  }
}

}  // namespace

void scale_last_channel(bf16* x, long rows, int D, float m, cudaStream_t stream) {
  if (rows <= 0) return;
  scale_last_channel_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(x, rows, D, m);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
