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
// The CUDA-core kernel, the chunking and the combine kernel live in decode_attention_cuda.h,
// shared with the quantized cache's attention (decode_attention_quantized.cu); this file gives
// them its bf16 pool as the source of rows.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "kernels/decode_attention_cuda.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using namespace decode;

// A bf16 pool: slot i of a head is row i % page_size of page pages[i / page_size].
template <int D>
struct PoolRows {
  const bf16* k_pool;
  const bf16* v_pool;
  const int32_t* pages;  // the head's page table
  int page_size;
  struct Raw {
    uint4 k, v;
  };
  __device__ __forceinline__ Raw fetch(int slot, int cl) const {
    const long off =
        (static_cast<long>(pages[slot / page_size]) * page_size + slot % page_size) * D + cl * 8;
    return Raw{*reinterpret_cast<const uint4*>(k_pool + off),
               *reinterpret_cast<const uint4*>(v_pool + off)};
  }
  __device__ __forceinline__ void key(const Raw& r, float (&f)[8]) const { unpack8(f, r.k); }
  __device__ __forceinline__ void value(const Raw& r, float (&f)[8]) const { unpack8(f, r.v); }
};

struct Params : Common {
  const bf16* k_pool;
  const bf16* v_pool;
  const int32_t* page_table;
  const int* lengths;
  int max_pages, page_size;
  bool shared_table;  // every row reads the page table of row 0 (a chunk's queries)
  __device__ __forceinline__ int length(long head) const { return lengths[head]; }
  __device__ __forceinline__ const int32_t* pages(long head) const {
    return page_table + (shared_table ? head % Hkv : head) * max_pages;
  }
  template <int D>
  __device__ __forceinline__ PoolRows<D> rows(long head) const {
    return PoolRows<D>{k_pool, v_pool, pages(head), page_size};
  }
};

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

  const int32_t* pages = p.pages(head);
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
                            int split_slots, float* lse, bool shared_table) {
  constexpr const char* kOp = "paged_decode_attention";
  if (B <= 0 || H <= 0) return;
  if (D != 64 && D != 128) fail(kOp, "head dim must be 64 or 128");
  if (Hkv <= 0 || H % Hkv != 0) fail(kOp, "H must be a multiple of Hkv");
  if (page_size <= 0 || max_pages <= 0) fail(kOp, "page_size and max_pages must be positive");
  if (probs != nullptr && probs_stride <= 0) fail(kOp, "probs_stride must be positive");
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out) |
       reinterpret_cast<uintptr_t>(k_pool) | reinterpret_cast<uintptr_t>(v_pool)) & 15u)
    fail(kOp, "q, out, k_pool and v_pool must be 16-byte aligned");
  const int G = H / Hkv;
  const bool tensor_cores = G >= 4 && G <= 16;
  const int GT = tensor_cores ? G : cuda_core_heads(G);
  const long ctas = static_cast<long>(B) * Hkv * (G / GT);
  if (ctas > 0x7fffffffL) fail(kOp, "too many (sequence, KV head) pairs for one launch");

  Params p{};
  p.out = out;
  p.probs = probs;
  p.probs_stride = probs_stride;
  p.q = q;
  p.k_pool = k_pool;
  p.v_pool = v_pool;
  p.lse = lse;
  p.page_table = page_table;
  p.shared_table = shared_table;
  p.lengths = lengths;
  p.max_pages = max_pages;
  p.page_size = page_size;
  p.H = H;
  p.Hkv = Hkv;
  p.G = G;
  p.scale_log2 = scale * kLog2e;
  p.exclude_ctrl = exclude_ctrl;
  plan_chunks(p, kOp, ctas, static_cast<long>(max_pages) * page_size, split_slots, B, D);
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(p.splits));
  if (tensor_cores && D == 64)
    launch_mma<64>(p, grid, stream);
  else if (tensor_cores)
    launch_mma<128>(p, grid, stream);
  else if (D == 64)
    launch_cuda_cores<64>(p, GT, grid, stream);
  else
    launch_cuda_cores<128>(p, GT, grid, stream);
  launch_combine(p, B, D, stream);
}

}  // namespace dmc::cuda
