// Paged decode attention on the GPU (spec: kernels/decode_attention.h): one new query token per
// sequence over a paged KV cache in which every (sequence, KV head) has its own length, GQA.
// A decode step reads each key/value row once for G query heads: with few heads per row the work
// is bound by the bytes of the cache, and CUDA cores keep up; with many, tensor cores do the math.
//
// CUDA-core kernel (groups of 1 to 3 query heads, or more than 16): grid (B·Hkv·(G/GT), splits).
//   A CTA (4 warps) owns GT query heads of one KV head (GT = the largest of 4, 2, 1 dividing G,
//   so those heads read each row once) and one chunk of `chunk` slots of that head; a CTA whose
//   chunk starts past the head's length exits at once. D/8 threads share a key row, 8 channels (one 16-byte load)
//   each, so a warp reads 32·16 contiguous bytes of a page per step (2 rows at D = 128, 4 at
//   D = 64), and every thread issues the page-table lookups and the 16-byte K and V loads of 4
//   rows before using them.
//   Scores: fp32 dot products (q pre-scaled by scale·log2 e; channel D-1 zeroed when
//   exclude_ctrl), summed over the row's threads with shuffles. Each row group keeps its own
//   online-softmax state (max, sum, 8 output channels per head) in base 2; the CTA merges its
//   row groups through shared memory at the end.
// GQA groups of 4 to 16 query heads run on tensor cores instead (decode_mma_kernel): on CUDA
//   cores every row is multiplied into G heads' dot products and G outputs, and at G = 8, head dim
//   64 that arithmetic, not the bytes, bounded the kernel (31% of the copy bandwidth, measured).
//   A CTA (4 warps) owns the whole group and one chunk; the group's queries are the M = 16 rows
//   (G used, the rest zero) of mma.sync m16n8k16, so S = Q K^T and O += P V are FlashAttention-2
//   products over 16-slot tiles. Each warp streams its own tiles (tile t to warp t % 4) through a
//   private ring of cp.async stages in XOR-swizzled shared memory (3–4 tiles in flight per warp,
//   no CTA-wide barrier in the loop); it keeps its own online-softmax state, and the CTA merges
//   the 4 warps' states through shared memory at the end, as the row groups above. P enters the
//   second product in bf16 (as in the training forward); scores and softmax stay fp32.
// One chunk per head and no probs: the CTA writes bf16 out directly. Otherwise (flash-decoding)
//   it writes its unnormalised output and (max, sum) to fp32 scratch, and the combine kernel
//   (one CTA per query head) merges the head's chunks in order and normalises; with probs, the
//   main kernel stores the base-2 scores and the combine kernel turns them into weights.
// Every reduction has a fixed order, so results are deterministic.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;          // rows per thread in flight
constexpr int kMaxChunk = 512;      // slots per CTA chosen automatically, at most
constexpr int kMinChunk = 64;       // ... and at least
constexpr int kScratchSlot = 10;    // detail::scratch slot of the split partials
constexpr int kCombineThreads = 128;

struct Params {
  bf16* out;
  float* part_o;   // [B·H, splits, D] unnormalised outputs of the chunks
  float* part_ml;  // [B·H, splits, 2] (max, sum) of the chunks, base 2
  float* probs;
  long probs_stride;
  const bf16* q;
  const bf16* k_pool;
  const bf16* v_pool;
  const int32_t* page_table;
  const int* lengths;
  int max_pages, page_size, H, Hkv, G, chunk, splits;
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
// writes zeros when nothing else will.
__device__ __forceinline__ void zero_empty_heads(const Params& p, long qh0, int heads, int D,
                                                 int len) {
  if (len <= 0 && blockIdx.y == 0 && p.direct)
    for (int i = threadIdx.x; i < heads * D; i += blockDim.x) p.out[qh0 * D + i] = tobf(0.f);
}

// Channel c of query head qh, merged over the CTA (max M, sum L, unnormalised output O): out
// directly, or this chunk's partials for the combine kernel.
__device__ __forceinline__ void store_chunk_result(const Params& p, long qh, int c, int D, float M,
                                                   float L, float O) {
  if (p.direct) {
    p.out[qh * D + c] = tobf(O / L);
  } else {
    const long slot = qh * p.splits + blockIdx.y;
    p.part_o[slot * D + c] = O;
    if (c == 0) {
      p.part_ml[2 * slot] = M;
      p.part_ml[2 * slot + 1] = L;
    }
  }
}

template <int D, int GT>
__global__ void __launch_bounds__(kThreads) decode_kernel(const Params p) {
  constexpr int TPR = D / 8;         // threads per key row
  constexpr int RPW = 32 / TPR;      // rows per warp per step
  constexpr int RG = kWarps * RPW;   // row groups per CTA
  constexpr int STEP = RG * kUnroll; // rows per loop iteration
  __shared__ float sm_acc[RG][GT][D];
  __shared__ float sm_m[RG][GT];
  __shared__ float sm_l[RG][GT];

  const int GC = p.G / GT;
  const int head = blockIdx.x / GC;  // b·Hkv + KV head
  const int gc = blockIdx.x - head * GC;
  const int b = head / p.Hkv;
  const int kvh = head - b * p.Hkv;
  const long qh0 = static_cast<long>(b) * p.H + static_cast<long>(kvh) * p.G + gc * GT;
  const int len = p.lengths[head];
  const long s0 = static_cast<long>(blockIdx.y) * p.chunk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cl = lane % TPR;                   // which 8 channels
  const int rg = warp * RPW + lane / TPR;      // which row group

  if (s0 >= len) {  // uniform over the CTA
    zero_empty_heads(p, qh0, GT, D, len);
    return;
  }
  const int s1 = static_cast<int>(min(static_cast<long>(len), s0 + p.chunk));

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
  const int32_t* pages = p.page_table + static_cast<long>(head) * p.max_pages;

  for (int base = static_cast<int>(s0); base < s1; base += STEP) {
    uint4 kr[kUnroll], vr[kUnroll];
    int row[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      row[u] = base + u * RG + rg;
      valid[u] = row[u] < s1;
      kr[u] = make_uint4(0u, 0u, 0u, 0u);
      vr[u] = make_uint4(0u, 0u, 0u, 0u);
      if (valid[u]) {
        const int page = pages[row[u] / p.page_size];
        const long off =
            (static_cast<long>(page) * p.page_size + row[u] % p.page_size) * D + cl * 8;
        kr[u] = *reinterpret_cast<const uint4*>(p.k_pool + off);
        vr[u] = *reinterpret_cast<const uint4*>(p.v_pool + off);
      }
    }
    float s[kUnroll][GT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      unpack8(kf, kr[u]);
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
      unpack8(vf, vr[u]);
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

constexpr int kMmaWarps = 4;
constexpr int kTileRows = 16;  // slots per warp tile: the two n8 score tiles of one m16n8k16 row
template <int D>
struct MmaLayout {
  static constexpr int kStages = D == 64 ? 4 : 3;          // 3 CTAs per SM at 64, 2 at 128
  static constexpr int kStageElems = 2 * kTileRows * D;    // K tile then V tile, bf16
  static constexpr int kWarpElems = kStages * kStageElems;
  static constexpr size_t kBytes = sizeof(bf16) * (16 * D + kMmaWarps * kWarpElems);
  // at the end a warp's stages hold its O [16][D], m [16] and l [16] in fp32
  static_assert(sizeof(bf16) * kWarpElems >= sizeof(float) * (16 * D + 32), "epilogue fits");
};

template <int D>
__global__ void __launch_bounds__(kMmaWarps * 32) decode_mma_kernel(const Params p) {
  using Layout = MmaLayout<D>;
  constexpr int NS = Layout::kStages;
  constexpr int CPR = D / 8;     // 16-byte chunks per row
  constexpr int RPP = 32 / CPR;  // rows a warp copies per pass
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [16][D], swizzled

  const int head = blockIdx.x;  // b·Hkv + KV head
  const int b = head / p.Hkv;
  const int kvh = head - b * p.Hkv;
  const long qh0 = static_cast<long>(b) * p.H + static_cast<long>(kvh) * p.G;
  const int len = p.lengths[head];
  const long s0 = static_cast<long>(blockIdx.y) * p.chunk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (s0 >= len) {  // uniform over the CTA
    zero_empty_heads(p, qh0, p.G, D, len);
    return;
  }
  const int s1 = static_cast<int>(min(static_cast<long>(len), s0 + p.chunk));
  bf16* stages = sQ + 16 * D + warp * Layout::kWarpElems;

  for (int i = tid; i < 16 * CPR; i += kMmaWarps * 32) {
    const int r = i / CPR, c = i - r * CPR;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < p.G) v = *reinterpret_cast<const uint4*>(p.q + (qh0 + r) * D + c * 8);
    *reinterpret_cast<uint4*>(sQ + swz<D>(r, c)) = v;
  }
  __syncthreads();
  const uint32_t offA = lane_off_a<D>(lane), offB = lane_off_b<D>(lane);
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qa[kk], frag<D>(smem_u32(sQ), offA, 0, kk));
  if (p.exclude_ctrl && (lane % 4) == 3) {  // channel D-1: the high half of a[2], a[3]
    qa[D / 16 - 1][2] &= 0x0000ffffu;
    qa[D / 16 - 1][3] &= 0x0000ffffu;
  }

  const int32_t* pages = p.page_table + static_cast<long>(head) * p.max_pages;
  const int ntiles = (s1 - static_cast<int>(s0) + kTileRows - 1) / kTileRows;
  const int my_tiles = ntiles > warp ? (ntiles - warp + kMmaWarps - 1) / kMmaWarps : 0;
  const int lc = lane % CPR, lr = lane / CPR;
  auto tile_start = [&](int i) { return static_cast<int>(s0) + (warp + i * kMmaWarps) * kTileRows; };
  auto load = [&](int i) {  // the warp's i-th tile into stage i % NS; slots past s1 zero-filled
    bf16* sK = stages + (i % NS) * Layout::kStageElems;
    bf16* sV = sK + kTileRows * D;
    const int t0 = tile_start(i);
#pragma unroll
    for (int j = 0; j < kTileRows / RPP; ++j) {
      const int r = lr + j * RPP, slot = t0 + r;
      const bool valid = slot < s1;
      long off = 0;
      if (valid)
        off = (static_cast<long>(pages[slot / p.page_size]) * p.page_size + slot % p.page_size) *
                  D + lc * 8;
      cp_async16(sK + swz<D>(r, lc), p.k_pool + off, valid);
      cp_async16(sV + swz<D>(r, lc), p.v_pool + off, valid);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < my_tiles) load(i);
    cp_async_commit();  // empty groups too, so the wait below counts the same every time
  }
  for (int i = 0; i < my_tiles; ++i) {
    if (i + NS - 1 < my_tiles) load(i + NS - 1);  // into the stage tile i - 1 used
    cp_async_commit();
    cp_async_wait<NS - 1>();
    __syncwarp();  // the other lanes' copies of tile i are visible
    const uint32_t uK = smem_u32(stages + (i % NS) * Layout::kStageElems);
    const uint32_t uV = uK + kTileRows * D * sizeof(bf16);
    float s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bb[4];
      ldsm_x4(bb, frag<D>(uK, offB, 0, kk));
      mma16816(s[0], qa[kk], bb[0], bb[1]);
      mma16816(s[1], qa[kk], bb[2], bb[3]);
    }
    // s[nb][e]: query head lane/4 + 8·(e/2), slot t0 + 8·nb + 2·(lane%4) + e%2
    const int t0 = tile_start(i);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int slot = t0 + nb * 8 + 2 * (lane % 4) + (e & 1);
        s[nb][e] = slot < s1 ? s[nb][e] * p.scale_log2 : -INFINITY;
        const int g = lane / 4 + 8 * (e >> 1);
        if (p.probs != nullptr && slot < s1 && g < p.G)
          p.probs[(qh0 + g) * p.probs_stride + slot] = s[nb][e];
      }
    // Online softmax (base 2) of rows lane/4 and lane/4 + 8; slot t0 < s1, so the maxima are
    // finite from the first tile on.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = fmaxf(fmaxf(s[0][2 * hh], s[0][2 * hh + 1]), fmaxf(s[1][2 * hh], s[1][2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_i[hh], mx);
      const float corr = ex2(m_i[hh] - m_new);
      m_i[hh] = m_new;
      l_i[hh] *= corr;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        o[nb][2 * hh] *= corr;
        o[nb][2 * hh + 1] *= corr;
      }
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        s[nb][2 * hh] = ex2(s[nb][2 * hh] - m_new);
        s[nb][2 * hh + 1] = ex2(s[nb][2 * hh + 1] - m_new);
        l_i[hh] += s[nb][2 * hh] + s[nb][2 * hh + 1];
      }
    }
    const uint32_t pa[4] = {pack_bf16(s[0][0], s[0][1]), pack_bf16(s[0][2], s[0][3]),
                            pack_bf16(s[1][0], s[1][1]), pack_bf16(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bb[4];
      ldsm_x4_t(bb, frag<D>(uV, offA, 0, dp));
      mma16816(o[2 * dp], pa, bb[0], bb[1]);
      mma16816(o[2 * dp + 1], pa, bb[2], bb[3]);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }

  // Each warp's state into its own stages (all of its copies have landed: every tile it loaded
  // was waited for), then the CTA merges the 4 warps (a warp with no tile: m = -inf, l = 0).
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 1);
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 2);
  }
  float* wO = reinterpret_cast<float*>(stages);
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
      part[w] = reinterpret_cast<const float*>(sQ + 16 * D + w * Layout::kWarpElems);
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
    store_chunk_result(p, qh0 + j, c, D, M, L, O);
  }
}

// One CTA per (sequence, query head): merges the head's chunks in chunk order, writes out, and
// turns the stored base-2 scores into attention weights.
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const Params p, int D) {
  const long bh = blockIdx.x;
  const int b = static_cast<int>(bh / p.H);
  const int g = static_cast<int>(bh - static_cast<long>(b) * p.H);
  const int len = p.lengths[static_cast<long>(b) * p.Hkv + g / p.G];
  const int n = len <= 0 ? 0
                         : static_cast<int>(min(static_cast<long>(p.splits),
                                                (static_cast<long>(len) + p.chunk - 1) / p.chunk));
  bf16* out = p.out + bh * D;
  if (n == 0) {
    for (int c = threadIdx.x; c < D; c += blockDim.x) out[c] = tobf(0.f);
    return;
  }
  const float* ml = p.part_ml + bh * p.splits * 2;
  const float* po = p.part_o + bh * p.splits * D;
  float M = -INFINITY;
  for (int s = 0; s < n; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < n; ++s) L = fmaf(exp2f(ml[2 * s] - M), ml[2 * s + 1], L);
  const float inv = 1.f / L;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float O = 0.f;
    for (int s = 0; s < n; ++s) O = fmaf(exp2f(ml[2 * s] - M), po[static_cast<long>(s) * D + c], O);
    out[c] = tobf(O * inv);
  }
  if (p.probs != nullptr) {
    float* pr = p.probs + bh * p.probs_stride;
    for (int i = threadIdx.x; i < len; i += blockDim.x) pr[i] = exp2f(pr[i] - M) * inv;
  }
}

template <int D>
void launch_main(const Params& p, int GT, dim3 grid, cudaStream_t stream) {
  switch (GT) {
    case 4: decode_kernel<D, 4><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: decode_kernel<D, 2><<<grid, kThreads, 0, stream>>>(p); break;
    default: decode_kernel<D, 1><<<grid, kThreads, 0, stream>>>(p); break;
  }
  DMC_CUDA_CHECK_LAUNCH();
}

// The tensor-core kernel's shared memory exceeds the 48 KiB default; set once, before any
// graph capture (the engine's reserve call comes first).
void configure_mma_kernels() {
  static bool configured = false;
  if (configured) return;
  DMC_CUDA_CHECK(cudaFuncSetAttribute(decode_mma_kernel<64>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(MmaLayout<64>::kBytes)));
  DMC_CUDA_CHECK(cudaFuncSetAttribute(decode_mma_kernel<128>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(MmaLayout<128>::kBytes)));
  configured = true;
}

template <int D>
void launch_mma(const Params& p, dim3 grid, cudaStream_t stream) {
  configure_mma_kernels();
  decode_mma_kernel<D><<<grid, kMmaWarps * 32, MmaLayout<D>::kBytes, stream>>>(p);
  DMC_CUDA_CHECK_LAUNCH();
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "paged_decode_attention: %s\n", what);
  std::abort();
}

}  // namespace

void paged_decode_attention_reserve(int B, int H, int D, int max_pages, int page_size,
                                    int split_slots) {
  configure_mma_kernels();
  const long max_len = static_cast<long>(max_pages) * page_size;
  const long splits = (max_len + split_slots - 1) / split_slots;
  scratch(kScratchSlot, sizeof(float) * static_cast<size_t>(B) * H * splits * (D + 2));
}

void paged_decode_attention(bf16* out, float* probs, int probs_stride, const bf16* q,
                            const bf16* k_pool, const bf16* v_pool, const int32_t* page_table,
                            const int* lengths, int max_pages, int page_size, int B, int H,
                            int Hkv, int D, bool exclude_ctrl, float scale, cudaStream_t stream,
                            int split_slots) {
  if (B <= 0 || H <= 0) return;
  if (D != 64 && D != 128) fail("head dim must be 64 or 128");
  if (Hkv <= 0 || H % Hkv != 0) fail("H must be a multiple of Hkv");
  if (page_size <= 0 || max_pages <= 0) fail("page_size and max_pages must be positive");
  if (probs != nullptr && probs_stride <= 0) fail("probs_stride must be positive");
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out) |
       reinterpret_cast<uintptr_t>(k_pool) | reinterpret_cast<uintptr_t>(v_pool)) & 15u)
    fail("q, out, k_pool and v_pool must be 16-byte aligned");
  const int G = H / Hkv;
  const bool tensor_cores = G >= 4 && G <= 16;
  const int GT = tensor_cores ? G : G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1;
  const long ctas = static_cast<long>(B) * Hkv * (G / GT);
  if (ctas > 0x7fffffffL) fail("too many (sequence, KV head) pairs for one launch");
  const long max_len = static_cast<long>(max_pages) * page_size;

  long chunk;
  if (split_slots > 0) {
    chunk = split_slots;
  } else {
    // Enough CTAs to fill the GPU a few times over (counting every chunk up to max_len), with
    // no CTA longer than kMaxChunk slots, so one long head does not hold up the tail.
    const long target = 16L * num_sms();
    chunk = kMaxChunk;
    while (chunk > kMinChunk && ctas * ((max_len + chunk - 1) / chunk) < target) chunk /= 2;
  }
  chunk = std::max(chunk, (max_len + 65534) / 65535);  // gridDim.y <= 65535
  if (chunk > max_len) chunk = max_len;
  if (chunk > 0x7fffffffL) fail("chunk too long");
  const int splits = static_cast<int>((max_len + chunk - 1) / chunk);

  Params p{};
  p.out = out;
  p.probs = probs;
  p.probs_stride = probs_stride;
  p.q = q;
  p.k_pool = k_pool;
  p.v_pool = v_pool;
  p.page_table = page_table;
  p.lengths = lengths;
  p.max_pages = max_pages;
  p.page_size = page_size;
  p.H = H;
  p.Hkv = Hkv;
  p.G = G;
  p.chunk = static_cast<int>(chunk);
  p.splits = splits;
  p.scale_log2 = scale * kLog2e;
  p.exclude_ctrl = exclude_ctrl;
  p.direct = splits == 1 && probs == nullptr;
  if (!p.direct) {
    const size_t n = static_cast<size_t>(B) * H * splits;
    float* part = static_cast<float*>(scratch(kScratchSlot, sizeof(float) * n * (D + 2)));
    p.part_o = part;
    p.part_ml = part + n * D;
  }
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(splits));
  if (tensor_cores && D == 64)
    launch_mma<64>(p, grid, stream);
  else if (tensor_cores)
    launch_mma<128>(p, grid, stream);
  else if (D == 64)
    launch_main<64>(p, GT, grid, stream);
  else
    launch_main<128>(p, GT, grid, stream);
  if (!p.direct) {
    combine_kernel<<<static_cast<unsigned>(static_cast<long>(B) * H), kCombineThreads, 0,
                     stream>>>(p, D);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dmc::cuda
