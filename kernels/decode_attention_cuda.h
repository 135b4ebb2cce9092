// CUDA-only pieces shared by the paged decode attention kernels (spec: kernels/decode_attention.h):
// decode_attention.cu reads bf16 pools, decode_attention_quantized.cu quantized pages, and both
// run the same CUDA-core kernel over their own source of rows, the same chunking (flash-decoding)
// and the same combine kernel; the design is described at the top of decode_attention.cu.
// A kernel's parameters derive from Common and add
//   __device__ int length(long head) const     the slots of (sequence, KV head) `head`
//   template <int D> __device__ Rows rows(long head) const   the source of that head's rows:
//     Raw fetch(int slot, int cl) const        loads channels [8·cl, 8·cl + 8) of the slot's key
//                                              and value (slot < length)
//     void key(const Raw&, float (&)[8]) const, value(...)   those channels in fp32; a
//                                              value-initialised Raw gives zeros (slots past the
//                                              chunk)
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda::decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;          // rows per thread in flight
constexpr int kMaxChunk = 512;      // slots per CTA chosen automatically, at most
constexpr int kMinChunk = 64;       // ... and at least
constexpr int kScratchSlot = 10;    // detail::scratch slot of the split partials
constexpr int kCombineThreads = 128;

struct Common {
  bf16* out;
  float* part_o;   // [B·H, splits, D] unnormalised outputs of the chunks
  float* part_ml;  // [B·H, splits, 2] (max, sum) of the chunks, base 2
  float* probs;
  long probs_stride;
  float* lse;  // [B·H] natural-log log-sum-exp of each query head's scores, or null
  const bf16* q;
  int H, Hkv, G, chunk, splits;
  float scale_log2;
  bool exclude_ctrl;
  bool direct;  // one chunk per head and no probs: write out from the main kernel
};

// 8 bf16 packed in a uint4 -> fp32 (a bf16 is the high half of an fp32).
__device__ __forceinline__ void unpack8(float (&f)[8], const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

// A chunk past the head's length does nothing, except that the first chunk of an empty head
// writes zeros (and a log-sum-exp of −inf: no scores) when nothing else will.
__device__ __forceinline__ void zero_empty_heads(const Common& p, long qh0, int heads, int D,
                                                 int len) {
  if (len <= 0 && blockIdx.y == 0 && p.direct) {
    for (int i = threadIdx.x; i < heads * D; i += blockDim.x)
      p.out[qh0 * D + i] = detail::tobf(0.f);
    if (p.lse != nullptr)
      for (int j = threadIdx.x; j < heads; j += blockDim.x) p.lse[qh0 + j] = -INFINITY;
  }
}

// Channel c of query head qh, merged over the CTA (max M, sum L, unnormalised output O): out
// directly, or this chunk's partials for the combine kernel.
__device__ __forceinline__ void store_chunk_result(const Common& p, long qh, int c, int D,
                                                   float M, float L, float O) {
  if (p.direct) {
    p.out[qh * D + c] = detail::tobf(O / L);
    if (c == 0 && p.lse != nullptr) p.lse[qh] = (M + log2f(L)) * detail::kLn2;
  } else {
    const long slot = qh * p.splits + blockIdx.y;
    p.part_o[slot * D + c] = O;
    if (c == 0) {
      p.part_ml[2 * slot] = M;
      p.part_ml[2 * slot + 1] = L;
    }
  }
}

// The CUDA-core kernel: GT query heads of one KV head, one chunk of its slots.
template <int D, int GT, class P>
__global__ void __launch_bounds__(kThreads) decode_kernel(const P p) {
  constexpr int TPR = D / 8;         // threads per key row
  constexpr int RPW = 32 / TPR;      // rows per warp per step
  constexpr int RG = kWarps * RPW;   // row groups per CTA
  constexpr int STEP = RG * kUnroll; // rows per loop iteration
  using Rows = decltype(p.template rows<D>(0));
  using Raw = typename Rows::Raw;
  __shared__ float sm_acc[RG][GT][D];
  __shared__ float sm_m[RG][GT];
  __shared__ float sm_l[RG][GT];

  const int GC = p.G / GT;
  const int head = blockIdx.x / GC;  // b·Hkv + KV head
  const int gc = blockIdx.x - head * GC;
  const int b = head / p.Hkv;
  const int kvh = head - b * p.Hkv;
  const long qh0 = static_cast<long>(b) * p.H + static_cast<long>(kvh) * p.G + gc * GT;
  const int len = p.length(head);
  const long s0 = static_cast<long>(blockIdx.y) * p.chunk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cl = lane % TPR;                   // which 8 channels
  const int rg = warp * RPW + lane / TPR;      // which row group

  if (s0 >= len) {  // uniform over the CTA
    zero_empty_heads(p, qh0, GT, D, len);
    return;
  }
  const int s1 = static_cast<int>(min(static_cast<long>(len), s0 + p.chunk));
  const Rows rows = p.template rows<D>(head);

  float qf[GT][8];
#pragma unroll
  for (int j = 0; j < GT; ++j) {
    unpack8(qf[j], *reinterpret_cast<const uint4*>(p.q + (qh0 + j) * D + cl * 8));
#pragma unroll
    for (int c = 0; c < 8; ++c) qf[j][c] *= p.scale_log2;
    if (p.exclude_ctrl && cl == TPR - 1) qf[j][7] = 0.f;  // channel D-1
  }
  float m[GT], l[GT], acc[GT][8];
#pragma unroll
  for (int j = 0; j < GT; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[j][c] = 0.f;
  }

  for (int base = static_cast<int>(s0); base < s1; base += STEP) {
    Raw raw[kUnroll];
    int row[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      row[u] = base + u * RG + rg;
      valid[u] = row[u] < s1;
      raw[u] = Raw{};
      if (valid[u]) raw[u] = rows.fetch(row[u], cl);
    }
    float s[kUnroll][GT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      rows.key(raw[u], kf);
#pragma unroll
      for (int j = 0; j < GT; ++j) {
        float d = 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c) d = fmaf(qf[j][c], kf[c], d);
        s[u][j] = d;
      }
    }
    // Sum over the TPR threads of each row (lanes of a row group are contiguous; every lane
    // takes part, invalid rows hold zeros).
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < GT; ++j) s[u][j] += __shfl_xor_sync(0xffffffffu, s[u][j], o);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < GT; ++j)
        if (!valid[u]) s[u][j] = -INFINITY;
    if (p.probs != nullptr && cl == 0) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (valid[u])
#pragma unroll
          for (int j = 0; j < GT; ++j) p.probs[(qh0 + j) * p.probs_stride + row[u]] = s[u][j];
    }
    // Online softmax (base 2). m_use keeps exp2 away from (-inf) - (-inf) while nothing valid
    // has been seen: then every weight and the correction are exp2(-inf) = 0.
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      float mx = s[0][j];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) mx = fmaxf(mx, s[u][j]);
      const float m_new = fmaxf(m[j], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float corr = exp2f(m[j] - m_use);
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        s[u][j] = exp2f(s[u][j] - m_use);
        psum += s[u][j];
      }
      l[j] = l[j] * corr + psum;
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[j][c] *= corr;
      m[j] = m_new;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[8];
      rows.value(raw[u], vf);
#pragma unroll
      for (int j = 0; j < GT; ++j)
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[j][c] = fmaf(s[u][j], vf[c], acc[j][c]);
    }
  }

  // Merge the CTA's row groups (a group that saw no valid row has m = -inf, l = 0, acc = 0).
#pragma unroll
  for (int j = 0; j < GT; ++j) {
#pragma unroll
    for (int c = 0; c < 8; ++c) sm_acc[rg][j][cl * 8 + c] = acc[j][c];
    if (cl == 0) {
      sm_m[rg][j] = m[j];
      sm_l[rg][j] = l[j];
    }
  }
  __syncthreads();
  for (int i = tid; i < GT * D; i += kThreads) {
    const int j = i / D, c = i - j * D;
    float M = -INFINITY;
#pragma unroll
    for (int r = 0; r < RG; ++r) M = fmaxf(M, sm_m[r][j]);
    // M is finite: slot s0 < s1 went to row group 0.
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      const float w = exp2f(sm_m[r][j] - M);
      L = fmaf(w, sm_l[r][j], L);
      O = fmaf(w, sm_acc[r][j][c], O);
    }
    store_chunk_result(p, qh0 + j, c, D, M, L, O);
  }
}

// One CTA per (sequence, query head): merges the head's chunks in chunk order, writes out, and
// turns the stored base-2 scores into attention weights.
template <class P>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const P p, int D) {
  const long bh = blockIdx.x;
  const int b = static_cast<int>(bh / p.H);
  const int g = static_cast<int>(bh - static_cast<long>(b) * p.H);
  const int len = p.length(static_cast<long>(b) * p.Hkv + g / p.G);
  const int n = len <= 0 ? 0
                         : static_cast<int>(min(static_cast<long>(p.splits),
                                                (static_cast<long>(len) + p.chunk - 1) / p.chunk));
  bf16* out = p.out + bh * D;
  if (n == 0) {
    for (int c = threadIdx.x; c < D; c += blockDim.x) out[c] = detail::tobf(0.f);
    if (threadIdx.x == 0 && p.lse != nullptr) p.lse[bh] = -INFINITY;
    return;
  }
  const float* ml = p.part_ml + bh * p.splits * 2;
  const float* po = p.part_o + bh * p.splits * D;
  float M = -INFINITY;
  for (int s = 0; s < n; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < n; ++s) L = fmaf(exp2f(ml[2 * s] - M), ml[2 * s + 1], L);
  const float inv = 1.f / L;
  if (threadIdx.x == 0 && p.lse != nullptr) p.lse[bh] = (M + log2f(L)) * detail::kLn2;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float O = 0.f;
    for (int s = 0; s < n; ++s) O = fmaf(exp2f(ml[2 * s] - M), po[static_cast<long>(s) * D + c], O);
    out[c] = detail::tobf(O * inv);
  }
  if (p.probs != nullptr) {
    float* pr = p.probs + bh * p.probs_stride;
    for (int i = threadIdx.x; i < len; i += blockDim.x) pr[i] = exp2f(pr[i] - M) * inv;
  }
}

[[noreturn]] inline void fail(const char* op, const char* what) {
  std::fprintf(stderr, "%s: %s\n", op, what);
  std::abort();
}

// Query heads per CTA of the CUDA-core kernel: the largest of 4, 2, 1 dividing G, so that those
// heads read each row once.
inline int cuda_core_heads(int G) { return G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1; }

// Sets p.chunk, p.splits and p.direct for heads of up to max_len slots, `ctas` CTAs per chunk
// index, and points the partials at scratch when a second pass combines them (p.probs set).
inline void plan_chunks(Common& p, const char* op, long ctas, long max_len, int split_slots, int B,
                        int D) {
  long chunk;
  if (split_slots > 0) {
    chunk = split_slots;
  } else {
    // Enough CTAs to fill the GPU a few times over (counting every chunk up to max_len), with
    // no CTA longer than kMaxChunk slots, so one long head does not hold up the tail.
    const long target = 16L * detail::num_sms();
    chunk = kMaxChunk;
    while (chunk > kMinChunk && ctas * ((max_len + chunk - 1) / chunk) < target) chunk /= 2;
  }
  chunk = std::max(chunk, (max_len + 65534) / 65535);  // gridDim.y <= 65535
  if (chunk > max_len) chunk = max_len;
  if (chunk > 0x7fffffffL) fail(op, "chunk too long");
  p.chunk = static_cast<int>(chunk);
  p.splits = static_cast<int>((max_len + chunk - 1) / chunk);
  p.direct = p.splits == 1 && p.probs == nullptr;
  if (!p.direct) {
    const size_t n = static_cast<size_t>(B) * p.H * p.splits;
    float* part = static_cast<float*>(detail::scratch(kScratchSlot, sizeof(float) * n * (D + 2)));
    p.part_o = part;
    p.part_ml = part + n * D;
  }
}

template <int D, class P>
void launch_cuda_cores(const P& p, int GT, dim3 grid, cudaStream_t stream) {
  switch (GT) {
    case 4: decode_kernel<D, 4><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: decode_kernel<D, 2><<<grid, kThreads, 0, stream>>>(p); break;
    default: decode_kernel<D, 1><<<grid, kThreads, 0, stream>>>(p); break;
  }
  DMC_CUDA_CHECK_LAUNCH();
}

// The second pass of split heads (nothing when the main kernel wrote out directly).
template <class P>
void launch_combine(const P& p, int B, int D, cudaStream_t stream) {
  if (p.direct) return;
  combine_kernel<<<static_cast<unsigned>(static_cast<long>(B) * p.H), kCombineThreads, 0,
                   stream>>>(p, D);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda::decode
