// Rotary position embedding on the GPU (spec: kernels/rope.h, and kernels/rope_positions.h for
// explicit positions), rotate-half layout, fp32 angles as Hugging Face computes them. One thread
// per (b, t, channel pair i, group of heads) computes the angle's sin/cos once and rotates the
// pair (i, i + D/2) of the group's heads. Token t sits at positions[t] when there is a position
// array (LoMA's layout), else at pos0 + t: one kernel for both, so the two agree to the bit
// where the positions do.
#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// A thread rotates channel pair (i, i + D/2) of one token in `heads_per_thread` heads (blockIdx.y
// picks them): the angle's sine and cosine serve every head of a training batch's tokens, and a
// decode step's few tokens (one per sequence: B·T·D/2 threads alone fill a few dozen blocks)
// spread their heads over more threads.
constexpr long kEnoughThreads = 128 * 1024;

// The backward writes its output (accumulate false) or adds into it (true).
template <bool kBackward>
__global__ void rope_kernel(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0,
                            const int32_t* positions, float theta, bool keep_last,
                            int heads_per_thread, bool accumulate) {
  const int half = D / 2;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long total = static_cast<long>(B) * T * half;
  if (idx >= total) return;
  const int i = static_cast<int>(idx % half);
  const long bt = idx / half;  // (b, t)
  const int t = static_cast<int>(bt % T);
  const float inv_freq = powf(theta, -2.0f * i / D);
  const int pos = positions ? positions[t] : pos0 + t;
  const float angle = static_cast<float>(pos) * inv_freq;
  float s, c;
  sincosf(angle, &s, &c);
  const bool ctrl = keep_last && i == half - 1;  // channel D-1 is the control channel
  const int h_end = min(H, (static_cast<int>(blockIdx.y) + 1) * heads_per_thread);
  for (int h = blockIdx.y * heads_per_thread; h < h_end; ++h) {
    const long base = (bt * H + h) * D;
    const float x1 = bf(inp[base + i]);
    const float x2raw = bf(inp[base + i + half]);
    const float x2 = ctrl ? 0.f : x2raw;
    if (!kBackward) {
      out[base + i] = tobf(x1 * c - x2 * s);
      out[base + i + half] = ctrl ? inp[base + i + half] : tobf(x2 * c + x1 * s);
    } else {
      const float d1 = x1 * c + x2 * s;
      const float d2 = ctrl ? x2raw : x2 * c - x1 * s;
      out[base + i] = tobf(accumulate ? bf(out[base + i]) + d1 : d1);
      out[base + i + half] = tobf(accumulate ? bf(out[base + i + half]) + d2 : d2);
    }
  }
}

template <bool kBackward>
void launch_rope(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0,
                 const int32_t* positions, float theta, bool keep_last, bool accumulate,
                 cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * (D / 2);
  if (total <= 0 || H <= 0) return;
  const int heads_per_thread = ceil_div(H, std::min<long>(H, ceil_div(kEnoughThreads, total)));
  const dim3 grid(ceil_div(total, 256), ceil_div(H, heads_per_thread));
  rope_kernel<kBackward><<<grid, 256, 0, stream>>>(out, inp, B, T, H, D, pos0, positions, theta,
                                                   keep_last, heads_per_thread, accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void rope_forward(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0, float theta,
                  bool keep_last_channel, cudaStream_t stream) {
  launch_rope<false>(out, inp, B, T, H, D, pos0, nullptr, theta, keep_last_channel, false,
                     stream);
}

void rope_backward(bf16* dinp, const bf16* dout, int B, int T, int H, int D, int pos0, float theta,
                   bool keep_last_channel, bool accumulate, cudaStream_t stream) {
  launch_rope<true>(dinp, dout, B, T, H, D, pos0, nullptr, theta, keep_last_channel, accumulate,
                    stream);
}

void rope_forward_positions(bf16* out, const bf16* inp, int B, int T, int H, int D,
                            const int32_t* positions, float theta, bool keep_last_channel,
                            cudaStream_t stream) {
  launch_rope<false>(out, inp, B, T, H, D, 0, positions, theta, keep_last_channel, false, stream);
}

void rope_backward_positions(bf16* dinp, const bf16* dout, int B, int T, int H, int D,
                             const int32_t* positions, float theta, bool keep_last_channel,
                             bool accumulate, cudaStream_t stream) {
  launch_rope<true>(dinp, dout, B, T, H, D, 0, positions, theta, keep_last_channel, accumulate,
                    stream);
}

}  // namespace dmc::cuda
