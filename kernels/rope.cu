// Rotary position embedding on the GPU (spec: kernels/rope.h, and kernels/rope_positions.h for
// explicit positions), rotate-half layout, fp32 angles as Hugging Face computes them. A thread
// takes channel pairs (i, i + D/2) of one token b, t in a group of heads: it computes the angles'
// sin/cos once and rotates those pairs in each head of the group. Vector path (D a multiple of 16,
// both buffers 16-byte aligned): 8 pairs a thread, i.e. a 16-byte word from each half of the
// head, with the words of 4 heads loaded before the first is used; one pair a thread otherwise.
// Token t sits at positions[t] when there is a position array (LoMA's layout), else at pos0 + t:
// the same kernels for both, so the two agree to the bit where the positions do. The input's
// tokens are in_ld elements apart (H·D when packed; the decode step's queries, rows of its Q, K,
// V product, are further apart); the output is packed.
#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr long kEnoughThreads = 128 * 1024;

// The rotation angle of pair i at the position of token t (explicit positions, or pos0 + t).
__device__ __forceinline__ float token_angle(int t, int i, int D, int pos0,
                                             const int32_t* positions, float theta) {
  return rope_angle(positions ? positions[t] : pos0 + t, i, D, theta);
}

// The backward writes its output (accumulate false) or adds into it (true).
template <bool kBackward>
__global__ void rope_scalar(bf16* out, const bf16* inp, long in_ld, int B, int T, int H, int D,
                            int pos0, const int32_t* positions, float theta, bool keep_last,
                            int heads_per_thread, bool accumulate) {
  producer_done();
  const int half = D / 2;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long total = static_cast<long>(B) * T * half;
  if (idx >= total) return;
  const int i = static_cast<int>(idx % half);
  const long bt = idx / half;  // (b, t)
  const int t = static_cast<int>(bt % T);
  float s, c;
  sincosf(token_angle(t, i, D, pos0, positions, theta), &s, &c);
  const bool ctrl = keep_last && i == half - 1;  // channel D-1 is the control channel
  const int h_end = min(H, (static_cast<int>(blockIdx.y) + 1) * heads_per_thread);
  for (int h = blockIdx.y * heads_per_thread; h < h_end; ++h) {
    const long base = (bt * H + h) * D, in = bt * in_ld + static_cast<long>(h) * D;
    const float x1 = bf(inp[in + i]);
    const float x2raw = bf(inp[in + i + half]);
    const float x2 = ctrl ? 0.f : x2raw;
    if (!kBackward) {
      out[base + i] = tobf(x1 * c - x2 * s);
      out[base + i + half] = ctrl ? inp[in + i + half] : tobf(x2 * c + x1 * s);
    } else {
      const float d1 = x1 * c + x2 * s;
      const float d2 = ctrl ? x2raw : x2 * c - x1 * s;
      out[base + i] = tobf(accumulate ? bf(out[base + i]) + d1 : d1);
      out[base + i + half] = tobf(accumulate ? bf(out[base + i + half]) + d2 : d2);
    }
  }
}

constexpr int kHeadGroup = 4;  // heads whose words a thread loads before rotating the first

// The vector path: a thread rotates pairs i0 .. i0+7 (i0 a multiple of 8) of one token.
template <bool kBackward>
__global__ void rope_vec(bf16* out, const bf16* inp, long in_ld, int B, int T, int H, int D,
                         int pos0, const int32_t* positions, float theta, bool keep_last,
                         int heads_per_thread, bool accumulate) {
  producer_done();
  const int half = D / 2, words = half / 8;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * words) return;
  const int i0 = static_cast<int>(idx % words) * 8;
  const long bt = idx / words;  // (b, t)
  const int t = static_cast<int>(bt % T);
  float s[8], c[8];
#pragma unroll
  for (int e = 0; e < 8; ++e)
    sincosf(token_angle(t, i0 + e, D, pos0, positions, theta), &s[e], &c[e]);
  // Pair half-1 (element 7 of the last word) holds the control channel D-1.
  const bool ctrl = keep_last && i0 + 8 == half;
  const int h_end = min(H, (static_cast<int>(blockIdx.y) + 1) * heads_per_thread);
  for (int h0 = blockIdx.y * heads_per_thread; h0 < h_end; h0 += kHeadGroup) {
    uint4 a[kHeadGroup], b[kHeadGroup], oa[kHeadGroup], ob[kHeadGroup];
#pragma unroll
    for (int g = 0; g < kHeadGroup; ++g) {
      if (h0 + g >= h_end) break;
      const bf16* x = inp + bt * in_ld + static_cast<long>(h0 + g) * D + i0;
      a[g] = *reinterpret_cast<const uint4*>(x);
      b[g] = *reinterpret_cast<const uint4*>(x + half);
      if (kBackward && accumulate) {
        const bf16* o = out + (bt * H + h0 + g) * D + i0;
        oa[g] = *reinterpret_cast<const uint4*>(o);
        ob[g] = *reinterpret_cast<const uint4*>(o + half);
      }
    }
#pragma unroll
    for (int g = 0; g < kHeadGroup; ++g) {
      if (h0 + g >= h_end) break;
      float x1[8], x2[8], o1[8], o2[8];
      unpack8(x1, a[g]);
      unpack8(x2, b[g]);
      const float x2_ctrl = x2[7];
      if (ctrl) x2[7] = 0.f;
      if (!kBackward) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          o1[e] = x1[e] * c[e] - x2[e] * s[e];
          o2[e] = x2[e] * c[e] + x1[e] * s[e];
        }
        if (ctrl) o2[7] = x2_ctrl;  // a bf16 converts to float and back exactly
      } else {
        if (accumulate) {
          unpack8(o1, oa[g]);
          unpack8(o2, ob[g]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) o1[e] = o2[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          o1[e] += x1[e] * c[e] + x2[e] * s[e];
          o2[e] += ctrl && e == 7 ? x2_ctrl : x2[e] * c[e] - x1[e] * s[e];
        }
      }
      bf16* o = out + (bt * H + h0 + g) * D + i0;
      *reinterpret_cast<uint4*>(o) = pack8(o1);
      *reinterpret_cast<uint4*>(o + half) = pack8(o2);
    }
  }
}

// Threads (b, t, pair or word) × head groups of heads_per_thread: the angles serve every head of
// a training batch's tokens, and a decode step's few tokens (one per sequence: B·T·D/2 threads
// alone fill a few dozen blocks) spread their heads over more threads.
template <bool kBackward>
void launch_rope(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0,
                 const int32_t* positions, float theta, bool keep_last, bool accumulate,
                 cudaStream_t stream, long in_ld = 0) {
  in_ld = row_stride_or(in_ld, static_cast<long>(H) * D);
  const bool vec = D % 16 == 0 && in_ld % 8 == 0 && aligned16(out, inp);
  const long total = static_cast<long>(B) * T * (D / 2) / (vec ? 8 : 1);
  if (total <= 0 || H <= 0) return;
  const int heads_per_thread = ceil_div(H, std::min<long>(H, ceil_div(kEnoughThreads, total)));
  const dim3 grid(ceil_div(total, 256), ceil_div(H, heads_per_thread));
  if (vec)
    launch_dependent(rope_vec<kBackward>, grid, 256, 0, stream, out, inp, in_ld, B, T, H, D,
                     pos0, positions, theta, keep_last, heads_per_thread, accumulate);
  else
    launch_dependent(rope_scalar<kBackward>, grid, 256, 0, stream, out, inp, in_ld, B, T, H, D,
                     pos0, positions, theta, keep_last, heads_per_thread, accumulate);
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
                            cudaStream_t stream, long inp_row_stride) {
  launch_rope<false>(out, inp, B, T, H, D, 0, positions, theta, keep_last_channel, false, stream,
                     inp_row_stride);
}

void rope_backward_positions(bf16* dinp, const bf16* dout, int B, int T, int H, int D,
                             const int32_t* positions, float theta, bool keep_last_channel,
                             bool accumulate, cudaStream_t stream) {
  launch_rope<true>(dinp, dout, B, T, H, D, 0, positions, theta, keep_last_channel, accumulate,
                    stream);
}

}  // namespace dmc::cuda
