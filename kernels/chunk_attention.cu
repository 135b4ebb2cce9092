// Attention of a chunk continuing one sequence's cache on the GPU (spec:
// kernels/chunk_attention.h), one pass on tensor cores: FlashAttention-2 over a key sequence
// that is the head's cached prefix (paged) followed by the chunk's own keys (causal).
//
// Rows: the chunk's queries of one KV head h, flattened as (token t, query head of the group):
//   row r = t·G + j reads query head h·G + j of token t (G = H / Hkv, any G), so a GQA group
//   shares every key tile, and a few tokens' groups fill the 16 rows of an mma.sync m16n8k16.
// Grid (ceil(n·G / 64), Hkv): a CTA (4 warps) owns 64 consecutive rows, each warp 16 of them
//   as the M rows of S = Q K^T and O += P V, with its queries in registers (channel D−1 zeroed
//   when exclude_ctrl). The CTA walks key tiles of 64 slots, first the prefix up to the largest
//   prefix[t, h] of its tokens, then the chunk's keys 0 .. its last token; the 4 warps share each
//   tile, which 128 threads copy with cp.async into XOR-swizzled shared memory (a ring of 2
//   stages: the next tile's copy overlaps this tile's products); slots past a tile's end are
//   zero-filled. Scores in fp32, base 2 (scale·log2 e); a prefix slot j counts for row r when
//   j < prefix[t, h], a chunk key i when i <= t, with mask[i, h]·log2 e added for i < t. Online
//   softmax per row (a row whose keys in a tile are all masked keeps its state: the max stays
//   −inf without a NaN); P enters the second product in bf16, as in the training forward. Every
//   row sees its own token's key, so each row ends with a finite max and a positive sum.
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
constexpr int kRows = kWarps * 16;  // query rows per CTA: 16 per warp, the M of m16n8k16
constexpr int kKeys = 64;           // key slots per tile
constexpr int kStages = 2;

struct Params {
  bf16* out;
  const bf16* q;
  const bf16* k_pool;
  const bf16* v_pool;
  const int32_t* page_table;  // [Hkv, max_pages]
  const int* prefix;          // [n, Hkv]
  const bf16* k;              // [n, Hkv, D]
  const bf16* v;
  const float* mask;  // [n, Hkv] or null
  int n, H, Hkv, G, max_pages, page_size;
  float scale_log2;
  bool exclude_ctrl;
};

// Shared bytes: the CTA's queries [kRows][D], then each stage's K and V tiles [kKeys][D] (bf16).
template <int D>
constexpr size_t smem_bytes() {
  return sizeof(bf16) * static_cast<size_t>(D) * (kRows + kStages * 2 * kKeys);
}

template <int D>
__global__ void __launch_bounds__(kWarps * 32) chunk_attention_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int max_prefix_s;
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sKV = sQ + kRows * D;  // stage s: K at sKV + s·2·kKeys·D, V right after
  constexpr int CPR = D / 8;   // 16-byte chunks per row
  const int h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rows = p.n * p.G, r0 = blockIdx.x * kRows;
  const int t_first = r0 / p.G, t_last = (min(r0 + kRows, rows) - 1) / p.G;
  auto q_offset = [&](int r) {  // of row r in q and out
    return (static_cast<long>(r / p.G) * p.H + static_cast<long>(h) * p.G + r % p.G) * D;
  };

  if (tid == 0) max_prefix_s = 0;
  __syncthreads();
  int longest = 0;
  for (int t = t_first + tid; t <= t_last; t += blockDim.x)
    longest = max(longest, p.prefix[static_cast<long>(t) * p.Hkv + h]);
  atomicMax(&max_prefix_s, longest);
  for (int i = tid; i < kRows * CPR; i += blockDim.x) {
    const int r = i / CPR, c = i - r * CPR;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + r < rows) v = *reinterpret_cast<const uint4*>(p.q + q_offset(r0 + r) + c * 8);
    *reinterpret_cast<uint4*>(sQ + swz<D>(r, c)) = v;
  }
  __syncthreads();
  const int prefix_len = max_prefix_s;
  const int prefix_tiles = (prefix_len + kKeys - 1) / kKeys;
  const int tiles = prefix_tiles + (t_last + 1 + kKeys - 1) / kKeys;

  // Tile i: prefix slots from i·kKeys (i < prefix_tiles), else chunk keys from
  // (i − prefix_tiles)·kKeys; its copies form one commit group.
  auto load = [&](int i) {
    bf16* sK = sKV + (i % kStages) * 2 * kKeys * D;
    bf16* sV = sK + kKeys * D;
    const bool cached = i < prefix_tiles;
    const int j0 = (cached ? i : i - prefix_tiles) * kKeys;
    const int end = cached ? prefix_len : t_last + 1;
    const bf16* ks = cached ? p.k_pool : p.k;
    const bf16* vs = cached ? p.v_pool : p.v;
    const int32_t* pages = p.page_table + static_cast<long>(h) * p.max_pages;
    for (int idx = tid; idx < kKeys * CPR; idx += blockDim.x) {
      const int r = idx / CPR, c = idx - r * CPR, j = j0 + r;
      const bool valid = j < end;
      long off = 0;
      if (valid && cached)
        off = (static_cast<long>(pages[j / p.page_size]) * p.page_size + j % p.page_size) * D;
      else if (valid)
        off = (static_cast<long>(j) * p.Hkv + h) * D;
      cp_async16(sK + swz<D>(r, c), ks + off + c * 8, valid);
      cp_async16(sV + swz<D>(r, c), vs + off + c * 8, valid);
    }
    cp_async_commit();
  };
  load(0);

  const uint32_t offA = lane_off_a<D>(lane), offB = lane_off_b<D>(lane);
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qa[kk], frag<D>(smem_u32(sQ), offA, warp * 16, kk));
  if (p.exclude_ctrl && (lane % 4) == 3) {  // channel D-1: the high half of a[2], a[3]
    qa[D / 16 - 1][2] &= 0x0000ffffu;
    qa[D / 16 - 1][3] &= 0x0000ffffu;
  }
  // This lane's rows: lane/4 and lane/4 + 8 of the warp's 16 (hh = 0, 1); a row past the chunk
  // sees nothing (token −1, prefix 0) and is not stored.
  int token[2], seen[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = r0 + warp * 16 + lane / 4 + 8 * hh;
    token[hh] = r < rows ? r / p.G : -1;
    seen[hh] = r < rows ? p.prefix[static_cast<long>(token[hh]) * p.Hkv + h] : 0;
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  for (int i = 0; i < tiles; ++i) {
    if (i + 1 < tiles) {
      load(i + 1);  // into the stage tile i − 1 used (every warp left it at the barrier below)
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile i's copies by every thread are visible
    const bool cached = i < prefix_tiles;
    const int j0 = (cached ? i : i - prefix_tiles) * kKeys;
    const uint32_t uK = smem_u32(sKV + (i % kStages) * 2 * kKeys * D);
    const uint32_t uV = uK + kKeys * D * sizeof(bf16);
    float s[kKeys / 8][4];
#pragma unroll
    for (int nb = 0; nb < kKeys / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int kg = 0; kg < kKeys / 16; ++kg) {
        uint32_t bb[4];
        ldsm_x4(bb, frag<D>(uK, offB, kg * 16, kk));
        mma16816(s[2 * kg], qa[kk], bb[0], bb[1]);
        mma16816(s[2 * kg + 1], qa[kk], bb[2], bb[3]);
      }
    // s[nb][e]: row lane/4 + 8·(e/2), key j0 + 8·nb + 2·(lane%4) + e%2
#pragma unroll
    for (int nb = 0; nb < kKeys / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hh = e >> 1, j = j0 + nb * 8 + 2 * (lane % 4) + (e & 1);
        float x = s[nb][e] * p.scale_log2;
        bool valid;
        if (cached) {
          valid = j < seen[hh];
        } else {
          valid = j <= token[hh];
          if (p.mask != nullptr && j < token[hh])
            x += p.mask[static_cast<long>(j) * p.Hkv + h] * kLog2e;
        }
        s[nb][e] = valid ? x : -INFINITY;
      }
    online_softmax_tile<kKeys / 8, D>(s, o, m_i, l_i);
#pragma unroll
    for (int kg = 0; kg < kKeys / 16; ++kg) {
      const uint32_t pa[4] = {pack_bf16(s[2 * kg][0], s[2 * kg][1]),
                              pack_bf16(s[2 * kg][2], s[2 * kg][3]),
                              pack_bf16(s[2 * kg + 1][0], s[2 * kg + 1][1]),
                              pack_bf16(s[2 * kg + 1][2], s[2 * kg + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_t(bb, frag<D>(uV, offA, kg * 16, dp));
        mma16816(o[2 * dp], pa, bb[0], bb[1]);
        mma16816(o[2 * dp + 1], pa, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done with tile i before its stage is refilled
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 1);
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 2);
    if (token[hh] < 0) continue;
    const float inv = 1.f / l_i[hh];
    bf16* dst = p.out + q_offset(r0 + warp * 16 + lane / 4 + 8 * hh) + 2 * (lane % 4);
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb)
      *reinterpret_cast<__nv_bfloat162*>(dst + nb * 8) =
          __floats2bfloat162_rn(o[nb][2 * hh] * inv, o[nb][2 * hh + 1] * inv);
  }
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "chunk_attention: %s\n", what);
  std::abort();
}

// The kernel's shared memory exceeds the 48 KiB default at D = 128; set once per head dim.
template <int D>
void launch(const Params& p, dim3 grid, cudaStream_t stream) {
  static const bool configured = [] {
    DMC_CUDA_CHECK(cudaFuncSetAttribute(chunk_attention_kernel<D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes<D>())));
    return true;
  }();
  (void)configured;
  chunk_attention_kernel<D><<<grid, kWarps * 32, smem_bytes<D>(), stream>>>(p);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void chunk_attention(bf16* out, const bf16* q, const bf16* k_pool, const bf16* v_pool,
                     const int32_t* page_table, int max_pages, int page_size, const int* prefix,
                     const bf16* k, const bf16* v, const float* mask, int n, int H, int Hkv, int D,
                     bool exclude_ctrl, float scale, cudaStream_t stream) {
  if (n <= 0) return;
  if (D != 32 && D != 64 && D != 128) fail("head dim must be 32, 64 or 128");
  if (Hkv <= 0 || H % Hkv != 0) fail("H must be a multiple of Hkv");
  if (Hkv > 65535) fail("more than 65535 KV heads");
  if (page_size <= 0 || max_pages <= 0) fail("page_size and max_pages must be positive");
  if (static_cast<long>(n) * (H / Hkv) > 0x7fffffffL - kRows) fail("chunk too long");
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out) |
       reinterpret_cast<uintptr_t>(k_pool) | reinterpret_cast<uintptr_t>(v_pool) |
       reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) & 15u)
    fail("q, out, the pools, k and v must be 16-byte aligned");
  const Params p{out, q,   k_pool, v_pool,  page_table, prefix,    k,         v,
                 mask, n,   H,      Hkv,     H / Hkv,    max_pages, page_size, scale * kLog2e,
                 exclude_ctrl};
  const dim3 grid(static_cast<unsigned>((static_cast<long>(n) * p.G + kRows - 1) / kRows),
                  static_cast<unsigned>(Hkv));
  if (D == 32)
    launch<32>(p, grid, stream);
  else if (D == 64)
    launch<64>(p, grid, stream);
  else
    launch<128>(p, grid, stream);
}

}  // namespace dmc::cuda
