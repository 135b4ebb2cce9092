// Rotary position embedding on the GPU (spec: kernels/rope.h), rotate-half layout, fp32 angles as
// Hugging Face computes them. One thread per channel pair (i, i + D/2).
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

template <bool kBackward>
__global__ void rope_kernel(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0,
                            float theta, bool keep_last) {
  const int half = D / 2;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long total = static_cast<long>(B) * T * H * half;
  if (idx >= total) return;
  const int i = static_cast<int>(idx % half);
  const long row = idx / half;  // (b, t, h)
  const int t = static_cast<int>((row / H) % T);
  const float inv_freq = powf(theta, -2.0f * i / D);
  const float angle = static_cast<float>(pos0 + t) * inv_freq;
  float s, c;
  sincosf(angle, &s, &c);
  const long base = row * D;
  const float x1 = bf(inp[base + i]);
  float x2 = bf(inp[base + i + half]);
  const bool ctrl = keep_last && i == half - 1;  // channel D-1 is the control channel
  if (ctrl) x2 = 0.f;
  float o1, o2;
  if (!kBackward) {
    o1 = x1 * c - x2 * s;
    o2 = x2 * c + x1 * s;
  } else {
    o1 = x1 * c + x2 * s;
    o2 = x2 * c - x1 * s;
  }
  if (!kBackward) {
    out[base + i] = tobf(o1);
    out[base + i + half] = ctrl ? inp[base + i + half] : tobf(o2);
  } else {
    out[base + i] = tobf(bf(out[base + i]) + o1);
    const float d2 = ctrl ? bf(inp[base + i + half]) : o2;
    out[base + i + half] = tobf(bf(out[base + i + half]) + d2);
  }
}

}  // namespace

void rope_forward(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0, float theta,
                  bool keep_last_channel, cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * H * (D / 2);
  if (total <= 0) return;
  rope_kernel<false><<<ceil_div(total, 256), 256, 0, stream>>>(out, inp, B, T, H, D, pos0, theta,
                                                              keep_last_channel);
  DMC_CUDA_CHECK_LAUNCH();
}

void rope_backward(bf16* dinp, const bf16* dout, int B, int T, int H, int D, int pos0, float theta,
                   bool keep_last_channel, cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * H * (D / 2);
  if (total <= 0) return;
  rope_kernel<true><<<ceil_div(total, 256), 256, 0, stream>>>(dinp, dout, B, T, H, D, pos0, theta,
                                                             keep_last_channel);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
