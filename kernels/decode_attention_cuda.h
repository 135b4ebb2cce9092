// CUDA-only pieces shared by the paged decode attention kernels (spec: kernels/decode_attention.h):
// decode_attention.cu reads bf16 pools, decode_attention_quantized.cu quantized pages,
// decode_attention_think.cu ThinK's pruned pages, and all
// run the same CUDA-core kernel over their own source of rows, the same tensor-core kernel over
// their own source of tiles (below, before decode_mma_kernel), the same chunking
// (flash-decoding) and the same combine kernel; the design is described at the top of
// decode_attention.cu.
// A kernel's parameters derive from Common and add
//   __device__ int length(long head) const     the slots of (sequence, KV head) `head`
//   template <int D> __device__ Rows rows(long head) const   the source of that head's rows:
//     kConsecutive                             the order of a loop step's rows: row group rg
//                                              takes slots base + rg·kUnroll + u (consecutive,
//                                              so a page's parameters are loaded once for them)
//                                              or base + u·RG + rg (neighbouring row groups read
//                                              neighbouring rows)
//     void fetch(Raw (&)[kUnroll], const int (&slot)[kUnroll], const bool (&valid)[kUnroll],
//                int cl) const                 loads channels [8·cl, 8·cl + 8) of each valid
//                                              slot's key and value, a value-initialised Raw for
//                                              the others
//     void key(const Raw&, float (&)[8]) const, value(...)   those channels in fp32; a
//                                              value-initialised Raw gives zeros (slots past the
//                                              chunk)
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <type_traits>
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
constexpr int kCombineWarps = 8;    // heads per combine CTA, a warp each

struct Common {
  bf16* out;
  float* part_o;   // [B·H, splits, D] unnormalised outputs of the chunks
  float* part_ml;  // [B·H, splits, 2] (max, sum) of the chunks, base 2
  float* probs;
  long probs_stride;
  const bf16* q;
  int H, Hkv, G, chunk, splits;
  float scale_log2;
  bool exclude_ctrl;
  bool direct;  // one chunk for every head and no probs: no combine kernel at all
  // Whether the source takes head dim 32 (the bf16 pool does; the quantized and the ThinK pages
  // take 64 and 128, so their kernels are not instantiated at 32).
  static constexpr bool kHeadDim32 = false;
};

using detail::unpack8;  // 8 bf16 packed in a uint4 -> fp32

// Whether a head's slots fit one chunk (an empty head's too) and no weights are asked for: then
// the main kernel writes the head's output directly and the combine kernel passes it by. Short
// heads (a compressed cache's many) so skip the round trip through the fp32 partials.
__device__ __forceinline__ bool single_chunk(const Common& p, int len) {
  return p.probs == nullptr && len <= p.chunk;
}

// A chunk past the head's length does nothing, except that the first chunk of an empty head
// writes zeros when nothing else will.
__device__ __forceinline__ void zero_empty_heads(const Common& p, long qh0, int heads, int D,
                                                 int len) {
  if (len <= 0 && blockIdx.y == 0 && single_chunk(p, len))
    for (int i = threadIdx.x; i < heads * D; i += blockDim.x)
      p.out[qh0 * D + i] = detail::tobf(0.f);
}

// Channel c of query head qh, merged over the CTA (max M, sum L, unnormalised output O): out
// directly when the head is one chunk (`single`), else this chunk's partials for the combine.
__device__ __forceinline__ void store_chunk_result(const Common& p, long qh, int c, int D,
                                                   bool single, float M, float L, float O) {
  if (single) {
    p.out[qh * D + c] = detail::tobf(O / L);
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
  detail::producer_done();
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
      row[u] = Rows::kConsecutive ? base + rg * kUnroll + u : base + u * RG + rg;
      valid[u] = row[u] < s1;
    }
    rows.fetch(raw, row, valid, cl);
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
    store_chunk_result(p, qh0 + j, c, D, single_chunk(p, len), M, L, O);
  }
}

// One warp per (sequence, query head) of more than one chunk (or with weights asked for): merges
// the head's chunks in chunk order, writes out, and turns the stored base-2 scores into attention
// weights. A warp, not a CTA, per head: most heads need a few hundred bytes merged, and a CTA each
// left the launch's waves of tiny CTAs, not the bytes, to set the time.
template <class P>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(const P p, long heads, int D) {
  detail::producer_done();
  const long bh = static_cast<long>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (bh >= heads) return;
  const int lane = threadIdx.x & 31;
  const int b = static_cast<int>(bh / p.H);
  const int g = static_cast<int>(bh - static_cast<long>(b) * p.H);
  const int len = p.length(static_cast<long>(b) * p.Hkv + g / p.G);
  if (single_chunk(p, len)) return;  // the main kernel wrote it
  const int n = len <= 0 ? 0
                         : static_cast<int>(min(static_cast<long>(p.splits),
                                                (static_cast<long>(len) + p.chunk - 1) / p.chunk));
  bf16* out = p.out + bh * D;
  if (n == 0) {
    for (int c = lane; c < D; c += 32) out[c] = detail::tobf(0.f);
    return;
  }
  const float* ml = p.part_ml + bh * p.splits * 2;
  const float* po = p.part_o + bh * p.splits * D;
  float M = -INFINITY;
  for (int s = 0; s < n; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < n; ++s) L = fmaf(exp2f(ml[2 * s] - M), ml[2 * s + 1], L);
  const float inv = 1.f / L;
  for (int c = lane; c < D; c += 32) {
    float O = 0.f;
    for (int s = 0; s < n; ++s) O = fmaf(exp2f(ml[2 * s] - M), po[static_cast<long>(s) * D + c], O);
    out[c] = detail::tobf(O * inv);
  }
  if (p.probs != nullptr) {
    float* pr = p.probs + bh * p.probs_stride;
    for (int i = lane; i < len; i += 32) pr[i] = exp2f(pr[i] - M) * inv;
  }
}

// The tensor-core kernel (GQA groups of 4 to 16; design at the top of decode_attention.cu): the
// whole group and one chunk per CTA, 16-slot tiles per warp through a private ring of kStages
// stages. A kernel's parameters for it also give
//   template <int D> __device__ int mma_warp_bytes() const   shared bytes of one warp (stages,
//                                            and the epilogue's fp32 O [16][D], m [16], l [16])
//   template <int D> __device__ Tiles tiles(long head) const   the source of that head's tiles:
//     kStages, kAligned                      ring depth; whether tiles start at multiples of 16
//                                            of the head's slots (else at the chunk's start)
//     void load(warp_smem, stage, t0, s0, s1, lane)   issues the cp.async copies of tile
//                                            [t0, t0 + 16) into stage `stage` (one commit group)
//     uint32_t ready(warp_smem, stage, t0, s0, s1, lane)   once those copies landed: the shared
//                                            address of the tile's keys, [16][D] bf16 swizzled
//                                            (swz<D>), values right after; slots outside
//                                            [s0, s1) finite (their scores are masked)
constexpr int kMmaWarps = 4;
constexpr int kTileRows = 16;  // slots per warp tile: the two n8 score tiles of one m16n8k16 row

// Shared bytes of the tensor-core kernel: the queries [16][D] bf16, then the warps' regions.
constexpr size_t mma_smem_bytes(int D, int warp_bytes) {
  return sizeof(bf16) * 16 * D + static_cast<size_t>(kMmaWarps) * warp_bytes;
}
// What the epilogue needs of a warp's region.
constexpr int mma_epilogue_bytes(int D) { return static_cast<int>(sizeof(float)) * (16 * D + 32); }

template <int D, class P>
__global__ void __launch_bounds__(kMmaWarps * 32) decode_mma_kernel(const P p) {
  detail::producer_done();
  using Tiles = decltype(p.template tiles<D>(0));
  constexpr int NS = Tiles::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [16][D], swizzled
  const int warp_bytes = p.template mma_warp_bytes<D>();

  const int head = blockIdx.x;  // b·Hkv + KV head
  const int b = head / p.Hkv;
  const int kvh = head - b * p.Hkv;
  const long qh0 = static_cast<long>(b) * p.H + static_cast<long>(kvh) * p.G;
  const int len = p.length(head);
  const long s0 = static_cast<long>(blockIdx.y) * p.chunk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (s0 >= len) {  // uniform over the CTA
    zero_empty_heads(p, qh0, p.G, D, len);
    return;
  }
  const int s1 = static_cast<int>(min(static_cast<long>(len), s0 + p.chunk));
  unsigned char* warp_smem = smem_raw + sizeof(bf16) * 16 * D + warp * warp_bytes;

  constexpr int CPR = D / 8;  // 16-byte chunks per row
  for (int i = tid; i < 16 * CPR; i += kMmaWarps * 32) {
    const int r = i / CPR, c = i - r * CPR;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < p.G) v = *reinterpret_cast<const uint4*>(p.q + (qh0 + r) * D + c * 8);
    *reinterpret_cast<uint4*>(sQ + detail::swz<D>(r, c)) = v;
  }
  __syncthreads();
  const uint32_t offA = detail::lane_off_a<D>(lane), offB = detail::lane_off_b<D>(lane);
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    detail::ldsm_x4(qa[kk], detail::frag<D>(detail::smem_u32(sQ), offA, 0, kk));
  if (p.exclude_ctrl && (lane % 4) == 3) {  // channel D-1: the high half of a[2], a[3]
    qa[D / 16 - 1][2] &= 0x0000ffffu;
    qa[D / 16 - 1][3] &= 0x0000ffffu;
  }

  const Tiles tiles = p.template tiles<D>(head);
  const int first = Tiles::kAligned ? static_cast<int>(s0) & ~(kTileRows - 1)
                                    : static_cast<int>(s0);
  const int ntiles = (s1 - first + kTileRows - 1) / kTileRows;
  const int my_tiles = ntiles > warp ? (ntiles - warp + kMmaWarps - 1) / kMmaWarps : 0;
  auto tile_start = [&](int i) { return first + (warp + i * kMmaWarps) * kTileRows; };
  auto load = [&](int i) {  // the warp's i-th tile into stage i % NS
    tiles.load(warp_smem, i % NS, tile_start(i), static_cast<int>(s0), s1, lane);
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < my_tiles) load(i);
    detail::cp_async_commit();  // empty groups too, so the wait below counts the same every time
  }
  for (int i = 0; i < my_tiles; ++i) {
    if (i + NS - 1 < my_tiles) load(i + NS - 1);  // into the stage tile i - 1 used
    detail::cp_async_commit();
    detail::cp_async_wait<NS - 1>();
    __syncwarp();  // the other lanes' copies of tile i are visible
    const int t0 = tile_start(i);
    const uint32_t uK = tiles.ready(warp_smem, i % NS, t0, static_cast<int>(s0), s1, lane);
    const uint32_t uV = uK + kTileRows * D * sizeof(bf16);
    float s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bb[4];
      detail::ldsm_x4(bb, detail::frag<D>(uK, offB, 0, kk));
      detail::mma16816(s[0], qa[kk], bb[0], bb[1]);
      detail::mma16816(s[1], qa[kk], bb[2], bb[3]);
    }
    // s[nb][e]: query head lane/4 + 8·(e/2), slot t0 + 8·nb + 2·(lane%4) + e%2
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int slot = t0 + nb * 8 + 2 * (lane % 4) + (e & 1);
        const bool valid = (!Tiles::kAligned || slot >= s0) && slot < s1;
        s[nb][e] = valid ? s[nb][e] * p.scale_log2 : -INFINITY;
        const int g = lane / 4 + 8 * (e >> 1);
        if (p.probs != nullptr && valid && g < p.G)
          p.probs[(qh0 + g) * p.probs_stride + slot] = s[nb][e];
      }
    detail::online_softmax_tile<2, D>(s, o, m_i, l_i);
    const uint32_t pa[4] = {detail::pack_bf16(s[0][0], s[0][1]), detail::pack_bf16(s[0][2], s[0][3]),
                            detail::pack_bf16(s[1][0], s[1][1]), detail::pack_bf16(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bb[4];
      detail::ldsm_x4_t(bb, detail::frag<D>(uV, offA, 0, dp));
      detail::mma16816(o[2 * dp], pa, bb[0], bb[1]);
      detail::mma16816(o[2 * dp + 1], pa, bb[2], bb[3]);
    }
    __syncwarp();  // every lane is done with this tile before its memory is refilled
  }

  // Each warp's state into its own region (all of its copies have landed: every tile it loaded
  // was waited for), then the CTA merges the 4 warps (a warp with no tile: m = -inf, l = 0).
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 1);
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 2);
  }
  float* wO = reinterpret_cast<float*>(warp_smem);
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      wO[(lane / 4 + 8 * (e >> 1)) * D + nb * 8 + 2 * (lane % 4) + (e & 1)] = o[nb][e];
  if (lane % 4 == 0)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      wO[16 * D + lane / 4 + 8 * hh] = m_i[hh];
      wO[16 * D + 16 + lane / 4 + 8 * hh] = l_i[hh];
    }
  __syncthreads();
  for (int i = tid; i < p.G * D; i += kMmaWarps * 32) {
    const int j = i / D, c = i - j * D;
    const float* part[kMmaWarps];
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w)
      part[w] = reinterpret_cast<const float*>(smem_raw + sizeof(bf16) * 16 * D + w * warp_bytes);
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) M = fmaxf(M, part[w][16 * D + j]);
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) {
      const float wt = exp2f(part[w][16 * D + j] - M);
      L = fmaf(wt, part[w][16 * D + 16 + j], L);
      O = fmaf(wt, part[w][j * D + c], O);
    }
    store_chunk_result(p, qh0 + j, c, D, single_chunk(p, len), M, L, O);
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
    float* part = static_cast<float*>(
        detail::scratch(detail::kScratchDecodeSplits, sizeof(float) * n * (D + 2)));
    p.part_o = part;
    p.part_ml = part + n * D;
  }
}

template <int D, class P>
void launch_cuda_cores(const P& p, int GT, dim3 grid, cudaStream_t stream) {
  switch (GT) {
    case 4: detail::launch_dependent(decode_kernel<D, 4, P>, grid, kThreads, 0, stream, p); break;
    case 2: detail::launch_dependent(decode_kernel<D, 2, P>, grid, kThreads, 0, stream, p); break;
    default: detail::launch_dependent(decode_kernel<D, 1, P>, grid, kThreads, 0, stream, p); break;
  }
}

// Lets the tensor-core kernel over P take up to `bytes` of shared memory (beyond the 48 KiB
// default); called once per kernel, before any graph capture.
template <int D, class P>
void allow_mma_smem(size_t bytes) {
  DMC_CUDA_CHECK(cudaFuncSetAttribute(decode_mma_kernel<D, P>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <int D, class P>
void launch_mma(const P& p, dim3 grid, size_t smem_bytes, cudaStream_t stream) {
  detail::launch_dependent(decode_mma_kernel<D, P>, grid, kMmaWarps * 32, smem_bytes, stream, p);
}

// Set the quantized and the ThinK cache's tensor-core kernels' shared-memory limits
// (decode_attention_quantized.cu, decode_attention_think.cu) once; paged_decode_attention_reserve
// calls them, so that it happens before any graph capture.
void configure_quantized_mma_kernels();
void configure_think_mma_kernels();

// The second pass of split heads (nothing when the main kernel wrote every head directly).
template <class P>
void launch_combine(const P& p, int B, int D, cudaStream_t stream) {
  if (p.direct) return;
  const long heads = static_cast<long>(B) * p.H;
  detail::launch_dependent(combine_kernel<P>,
                           static_cast<unsigned>((heads + kCombineWarps - 1) / kCombineWarps),
                           kCombineWarps * 32, 0, stream, p, heads, D);
}

// What every paged decode attention's launch shares once its Params hold the cache's source:
// the fields of Common, CTAs of a whole GQA group on tensor cores (when the source allows them)
// or of cuda_core_heads(G) heads on CUDA cores, the chunk plan over heads of up to max_len
// slots, the main kernel (mma_smem bytes of shared memory on tensor cores) and the combine.
template <class P>
void launch_decode(P& p, const char* op, bf16* out, float* probs, int probs_stride, const bf16* q,
                   int B, int H, int Hkv, int D, bool exclude_ctrl, float scale,
                   bool tensor_cores, long max_len, int split_slots, size_t mma_smem,
                   cudaStream_t stream) {
  p.out = out;
  p.probs = probs;
  p.probs_stride = probs_stride;
  p.q = q;
  p.H = H;
  p.Hkv = Hkv;
  p.G = H / Hkv;
  p.scale_log2 = scale * detail::kLog2e;
  p.exclude_ctrl = exclude_ctrl;
  const int GT = tensor_cores ? p.G : cuda_core_heads(p.G);
  const long ctas = static_cast<long>(B) * Hkv * (p.G / GT);
  if (ctas > 0x7fffffffL) fail(op, "too many (sequence, KV head) pairs for one launch");
  plan_chunks(p, op, ctas, max_len, split_slots, B, D);
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(p.splits));
  auto launch = [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    if (tensor_cores)
      launch_mma<kD>(p, grid, mma_smem, stream);
    else
      launch_cuda_cores<kD>(p, GT, grid, stream);
  };
  bool launched = false;
  if constexpr (P::kHeadDim32)
    if (D == 32) {
      launch(std::integral_constant<int, 32>{});
      launched = true;
    }
  if (!launched && D == 64)
    launch(std::integral_constant<int, 64>{});
  else if (!launched)
    launch(std::integral_constant<int, 128>{});
  launch_combine(p, B, D, stream);
}

}  // namespace dmc::cuda::decode
