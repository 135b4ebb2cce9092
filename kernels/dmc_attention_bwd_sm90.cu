// Fused DMC attention backward for Hopper (sm_90a; spec: kernels/dmc_attention.h): the main
// kernel of kernels/dmc_attention.cu's backward (its pre-pass computes Delta = rowsum(dO · O) and
// lse · log2 e, its post-pass writes or adds the fp32 dQ accumulator into dq) on Hopper's
// warpgroup MMA, in FlashAttention-3's backward layout.
//
// CTA = 128 keys of one KV head (a key tile; the grid schedule: a CTA per key tile, the persistent
// one below: a CTA per SM taking key tiles one after another), looping over the G query
// heads of the group and, for each, the BM-query tiles that reach its keys (at or after the
// first key); BM = 64 at head dim 128, 128 at head dim 64 (BwdTiles). Per tile, consumer
// warpgroup w (keys 64w + [0, 64)) computes
//   S^T  = K_w Q^T                  (64 keys x BM queries; K, Q K-major in shared memory)
//   dP^T = V_w dO^T                 (V, dO K-major)
//   P^T  = exp2(S^T·scale·log2 e + bias[key]·[query - key > window] - lse2[query]), causal and
//          past-T entries 0 (lse2 = lse · log2 e: P is the forward's normalised probability)
//   dS^T = P^T ∘ (dP^T - Delta[query]);  dmask[key] += Σ_query dS^T where the bias applies
//   dV_w += P^T dO,  dK_w += dS^T Q  (P^T, dS^T from registers as A; dO, Q N-major; fp32
//          accumulators held in registers over the whole loop, written once at the end)
//   dQ   = dS K over all 128 keys, one 64-query x 64-channel block per warpgroup (BM x D holds
//          two: at head dim 128 warpgroup w takes channels 64w + [0, 64) of all 64 queries, at 64
//          queries 64w + [0, 64) of all channels): dS^T of both warpgroups goes through shared
//          memory (read M-major as A), K N-major as B; added into the fp32 dQ accumulator by TMA
//          (below; not bit-reproducible run to run, as with FlashAttention's atomics).
// At head dim 128 the tiles overlap (BwdTiles::kPipelined): a tile's dK runs on into the next
// tile, and its dQ is issued a tile late, once the other warpgroup's half of dS^T is long stored,
// so the two warpgroups are not held in step and one's softmax can run beside the other's GEMMs.
// dmask needs no atomics: every key of the CTA belongs to one quad of one warp, which sums its
// row over all query tiles and heads in registers. exclude_ctrl: channel D-1 of the K tile is
// zeroed in shared memory once, so it drops out of every score; dK and dQ skip that channel.
//
// The dQ path (FlashAttention-3's): no consumer thread adds dQ into global memory itself, so none
// issues and waits on 16 vector atomics per tile (its 32 values of the block). Each consumer warp
// stores its 16 queries x 64 channels of scale · dQ into its own shared staging buffer (fp32,
// 128-byte swizzled: conflict-free stores from the accumulator layout), and its lane 0 issues TMA
// reduce-adds of the buffer into dq_acc, addressed by a tensor map over [B, T, H, D] fp32 (the
// layout the portable kernel and the post-pass share; queries past T are clipped by the TMA unit).
// The reduce-adds run in the L2 while the warp goes on to the next tile; before rewriting the
// buffer a tile later, lane 0 waits until the previous ones have read it
// (cp.async.bulk.wait_group.read, long done by then), so one buffer per warp suffices. Per warp,
// not per warpgroup as in FlashAttention-3 (there a producer warp issues one bulk reduce of the
// warpgroup's block into a dQ accumulator laid out tile by tile): a warp's rows are its own, so
// only __syncwarp orders its stores and its reduce-adds, and dq_acc keeps the row layout.
//
// A producer warp issues the TMA loads: K, V once per key tile; Q and dO tiles, and the tiles' rows of lse2 and
// Delta (rows of [B·H, T] fp32, attention_stats_stride(T) apart), kStages deep. Each stage has a
// full mbarrier (all four landed: expect_tx counts their bytes) and an empty one (every consumer
// thread is done with the stage), as in the sm90 forward. Shared tiles, descriptors and the wgmma
// and TMA wrappers: kernels/wgmma_sm90.h. Head dims 64 and 128.
#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "kernels/wgmma_sm90.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// q, k, v, dout, lse2, delta and dq_acc reach the kernel as tensor maps (BwdMaps)
struct BwdParams {
  const float* mask;  // [B, T, Hkv] or null
  bf16* dk;           // [B, T, Hkv, D], written or accumulated (accumulate)
  bf16* dv;
  float* dmask;  // [B, T, Hkv] or null, written or accumulated
  int B, T, H, Hkv;
  float scale, scale_log2;
  bool exclude_ctrl;
  int window;  // the mask applies where query - key > window (DMC: 0; DMS: w)
  bool accumulate;  // add into dk, dv, dmask (else write them: one thread owns each element)
};

constexpr int kBN = 128;       // keys per CTA: 64 per consumer warpgroup, the M of its wgmmas
constexpr int kStages = 2;     // Q / dO tiles in flight
constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
static_assert(kBN == 2 * 64, "one 64-row wgmma tile of keys per consumer warpgroup");

// Queries per tile (N of S^T and dP^T, the reduction of dV and dK), as FlashAttention-3's Hopper
// backward chooses them: 64 at head dim 128, 128 at 64, where the dK and dV accumulators (D/2
// registers each) are half as large and leave room for S^T and dP^T twice as wide (BM/2 each),
// so each Q / dO tile brought in carries twice the work. Either way BM x D is two 64 x 64 blocks
// of dQ, one per consumer warpgroup.
template <int D>
struct BwdTiles {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static constexpr int kBM = D == 64 ? 128 : 64;
  static constexpr int kQBlocks = kBM / 64;  // 64-query blocks of dQ (the other factor: D / 64)
  static_assert(kQBlocks * (D / 64) == 2, "one 64 x 64 block of dQ per consumer warpgroup");
  // Registers per thread moved by setmaxnreg (ptxas -v): the producer takes setmaxnreg's least, 24
  // (the persistent one's tile order and claims fit), the consumers the rest, 240.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // At head dim 128 the tiles overlap (kPipelined): a tile issues dV, then the previous tile's dQ,
  // then its own dK, which runs on while that dQ goes out and the next tile's S^T and dP^T are
  // issued. Its A fragments (dS^T, 16 registers) then live across the loop beside the next
  // tile's S^T and dP^T, which fits in 240 registers. dQ needs both warpgroups' halves of dS^T;
  // a tile later, the other warpgroup's half is long stored, so neither waits on the other's
  // softmax and the two can drift apart, one's softmax beside the other's GEMMs. At head dim 64
  // (S^T and dP^T twice as wide) ptxas serialises every wgmma (C7512) even so: there a tile
  // issues dV and dK, then its own dQ once both halves are stored, and waits for all three.
  static constexpr bool kPipelined = D == 128;
  static constexpr int kDsBuffers = kPipelined ? 3 : 2;  // dS^T tiles (BwdSmem::ds)
  // setmaxnreg only moves registers within the CTA's allocation at launch (384 threads x 168)
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 384 * 168, "the CTA's registers");
};
// named barriers (0 is __syncthreads)
constexpr int kBarKZeroed = 1;  // + consumer warpgroup: its K rows' control channel zeroed
constexpr int kBarDsStored = 3;  // both consumer warpgroups: their halves of dS^T stored
// kPipelined: warpgroup w's view of the other one, tile c: its half of dS^T stored and its dQ of
// every earlier tile finished (it arrives, w waits); parity c % 2, so that it arrives for tile
// c + 2 only after w has waited for tile c
constexpr int kBarDsReady = 4;  // + 2 w + c % 2
__device__ __forceinline__ int ds_ready_barrier(int wg, int c) {
  return kBarDsReady + 2 * wg + c % 2;
}

template <int D>
struct BwdSmem {
  static constexpr int kBM = BwdTiles<D>::kBM;
  bf16 k[kBN * D];              // A (K-major) of S^T = K Q^T; B (N-major) of dQ = dS K
  bf16 v[kBN * D];              // A (K-major) of dP^T = V dO^T
  bf16 q[kStages][kBM * D];     // B (K-major) of S^T; B (N-major) of dK += dS^T Q
  bf16 dout[kStages][kBM * D];  // B (K-major) of dP^T; B (N-major) of dV += P^T dO
  // dS^T [keys][queries], A (M-major) of dQ = dS K. Otherwise two buffers: a warpgroup writes
  // tile c + 1's half while the other may still read tile c's in its dQ wgmma (the dS barrier of
  // tile c + 1 orders the write of tile c + 2 after that read). Under kPipelined three: tile c's
  // dQ is issued in tile c + 1, so a warpgroup may write tile c + 2's half while the other still
  // reads tile c's; it writes tile c + 3's only after waiting for the other's arrival of tile
  // c + 1, which follows that read.
  bf16 ds[BwdTiles<D>::kDsBuffers][kBN * kBM];
  // scale · dQ of each consumer warp's 16 queries x 64 channels, the source of its TMA reduce-adds:
  // two boxes of [16][32] fp32 (channels 32 half + [0, 32)), 128-byte swizzled (dq_staged)
  float dq[8][2][16 * 32];
  float lse2[kStages][kBM];  // TMA destinations: each stage's row 128-byte aligned
  float delta[kStages][kBM];
  uint64_t kv_full, kv_empty, full[kStages], empty[kStages];
  int tile;  // the persistent schedule's current key tile (-1: none left), set with kv_full
  static_assert((sizeof(bf16) * kBN * D) % 1024 == 0 && (sizeof(bf16) * kBM * D) % 1024 == 0 &&
                    (sizeof(bf16) * kBN * kBM) % 1024 == 0 && sizeof(dq[0][0]) % 1024 == 0 &&
                    sizeof(lse2[0]) % 128 == 0,
                "every tile and dQ box starts on a 1024-byte swizzle atom, every row on 128 bytes");
};
// 1024 bytes of slack align the tiles (launch_bwd); the opt-in maximum per block is 227 KiB
static_assert(1024 + sizeof(BwdSmem<64>) <= 227 * 1024 && 1024 + sizeof(BwdSmem<128>) <= 227 * 1024,
              "shared memory per block");

struct BwdMaps {
  CUtensorMap q, k, v, dout;  // bf16 [B, T, heads, D] tiles (make_tile_map)
  CUtensorMap lse2, delta;    // fp32 [B·H][T] rows, one box: a tile's kBM queries (zeros past T)
  CUtensorMap dq_acc;         // fp32 [B, T, H, D], one box: 16 queries x 32 channels, swizzled
};

// P^T for the thread's keys key_lo, key_lo + 8 (rows) and the tile's queries (columns): s holds
// S^T on entry, the probabilities on return. Off the edge (every query after every key of the
// warp by more than the window, none past T) no index test is needed. kEdge is a template
// argument (here and in score_grads) so that the caller branches once a tile, as in the sm90
// forward's softmax_tile.
template <int kBM, bool kEdge>
__device__ __forceinline__ void probabilities(float (&s)[kBM / 2], const float* lse2,
                                              const float (&bias)[2], int key_lo, int q0,
                                              const BwdParams& p) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kBM / 8; ++j) {
    const float2 l = *reinterpret_cast<const float2*>(lse2 + j * 8 + 2 * (lane % 4));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hh = e >> 1;
      const float lq = (e & 1) ? l.y : l.x;
      float& x = s[4 * j + e];
      if constexpr (!kEdge) {
        x = ex2(fmaf(x, p.scale_log2, bias[hh] - lq));
      } else {
        const int query = q0 + j * 8 + 2 * (lane % 4) + (e & 1), key = key_lo + 8 * hh;
        const float y = ex2(fmaf(x, p.scale_log2, (query - key > p.window ? bias[hh] : 0.f) - lq));
        x = (query >= key && query < p.T) ? y : 0.f;  // keys past T fail query >= key
      }
    }
  }
}

// dS^T = P^T ∘ (dP^T - Delta) into dp; dm[hh] += the sum over the queries where the bias applies
// (its gradient) of row key_lo + 8 hh. P^T is 0 wherever the key is not visible, so is dS^T.
template <int kBM, bool kEdge>
__device__ __forceinline__ void score_grads(float (&dp)[kBM / 2], const float (&pt)[kBM / 2],
                                            const float* delta, float (&dm)[2], int key_lo, int q0,
                                            const BwdParams& p) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kBM / 8; ++j) {
    const float2 d = *reinterpret_cast<const float2*>(delta + j * 8 + 2 * (lane % 4));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hh = e >> 1;
      const float ds = pt[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? d.y : d.x));
      dp[4 * j + e] = ds;
      if constexpr (!kEdge) {
        dm[hh] += ds;
      } else {
        const int query = q0 + j * 8 + 2 * (lane % 4) + (e & 1), key = key_lo + 8 * hh;
        dm[hh] += query - key > p.window ? ds : 0.f;
      }
    }
  }
}

// The thread's dS^T values, packed as A fragments (pack_a_fragments: da[kk][r] holds row
// row_lo + 8 (r % 2), columns 16 kk + 8 (r / 2) + 2 (lane % 4) + {0, 1}), into the swizzled
// [kBN][kBM] tile ds.
template <int kBM>
__device__ __forceinline__ void store_ds(bf16* ds, const uint32_t (&da)[kBM / 16][4], int row_lo) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < kBM / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      *reinterpret_cast<uint32_t*>(
          ds + swizzled<kBN>(row_lo + 8 * (r % 2), 16 * kk + 8 * (r / 2) + 2 * (lane % 4))) =
          da[kk][r];
}

// Float offset of (row, column) of a warp's dQ staging buffer (BwdSmem::dq): box column / 32, in
// it the 16-byte chunk c of row r at chunk c ^ (r % 8), the layout the tensor map's 128-byte
// swizzle reads.
__device__ __forceinline__ int dq_staged(int row, int col) {
  return (col / 32) * 16 * 32 + row * 32 + ((((col % 32) / 4) ^ (row % 8)) << 2) + col % 4;
}

// dq_acc += scale · dQ for the warp's 16 rows of a 64-query x 64-channel block: query q0 + 16 warp
// + row, channel c0 + column, head h. The thread's accumulator values go to the warp's staging
// buffer; lane 0 then issues the reduce-adds. Channel D-1 gets nothing under exclude_ctrl.
template <int kD>
__device__ __forceinline__ void add_dq(float* staged, const float (&dq)[32], int q0, int c0, int b,
                                       int h, const CUtensorMap* dq_map, const BwdParams& p) {
  const int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  if (lane == 0) bulk_wait_read<0>();  // the previous tile's reduce-adds have read the buffer
  __syncwarp();
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = lane / 4 + 8 * hh;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = j * 8 + 2 * (lane % 4);
      const float v0 = dq[4 * j + 2 * hh] * p.scale;
      float v1 = dq[4 * j + 2 * hh + 1] * p.scale;
      if (p.exclude_ctrl && c0 + c + 1 == kD - 1) v1 = 0.f;
      *reinterpret_cast<float2*>(staged + dq_staged(row, c)) = make_float2(v0, v1);
    }
  }
  fence_proxy_async();  // read next by the TMA unit
  __syncwarp();
  if (lane == 0) {
    tma_reduce_add(dq_map, staged, c0, h, q0 + 16 * warp, b);
    tma_reduce_add(dq_map, staged + 16 * 32, c0 + 32, h, q0 + 16 * warp, b);
    bulk_commit();
  }
}

// Two schedules (kPersistent), as the sm90 forward's: the grid one, a CTA per key tile (key tile
// x KV head x sequence); the persistent one, a CTA per SM taking key tiles one after another
// (persistent_tile's order over the (b, hk) KV heads, the first key tiles, whose query loops are
// the longest, first), the next one claimed from a counter by the producer. The producer loads
// the next key tile's K and V once the consumers' last GEMMs have read the current ones
// (kv_empty), while they write the current tile's dK, dV and dmask; the Q / dO stages, their
// barrier phases and the dS buffers' alternation run on across a CTA's key tiles (query tile it
// of its i-th key tile is the CTA's (g_i + it)-th, g_i the query tiles of its earlier ones).
template <int kD, bool kPersistent>
__global__ void __launch_bounds__(kThreads, 1)
    attn_bwd_sm90_kernel(const __grid_constant__ BwdMaps maps, const BwdParams p, int* next_tile,
                         int section) {
  extern __shared__ unsigned char smem_raw[];
  // the swizzle atoms must be 1024-byte aligned in the shared address space
  BwdSmem<kD>& sm =
      *reinterpret_cast<BwdSmem<kD>*>(smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024);
  constexpr int kBM = BwdTiles<kD>::kBM;

  const int T = p.T, H = p.H, Hkv = p.Hkv, G = H / Hkv;
  const int ntiles = (T + kBN - 1) / kBN, heads = p.B * Hkv, num_tiles = ntiles * heads;
  // Key tile i: keys k0 + [0, kBN) of KV head hk of sequence b; query tiles m_first.. reach them
  // (queries before k0 see none), iters query tiles in all over the G query heads of the group
  // (tile it: query head hk G + it / n_m, query tile m_first + it % n_m).
  struct KeyTile {
    int hk, b, k0, m_first, n_m, iters;
  };
  auto tile_of = [&](int i) {
    KeyTile t;
    if constexpr (kPersistent) {  // the (b, hk) heads, hk fastest; the first key tiles first
      const PersistentTile w = persistent_tile(i, ntiles, heads, section);
      t.k0 = w.rank * kBN, t.hk = w.head % Hkv, t.b = w.head / Hkv;
    } else {
      t.k0 = blockIdx.x * kBN, t.hk = blockIdx.y, t.b = blockIdx.z;
    }
    t.m_first = t.k0 / kBM;
    t.n_m = (T + kBM - 1) / kBM - t.m_first;
    t.iters = G * t.n_m;
    return t;
  };
  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    mbar_init(&sm.kv_full, 1);
    mbar_init(&sm.kv_empty, kThreads - 128);
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&sm.full[i], 1);
      mbar_init(&sm.empty[i], kThreads - 128);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // setmaxnreg moves registers within the CTA's allocation at launch, 384 threads x 168 (the
    // static_assert in BwdTiles): a producer above 24 beside consumers at 240 would leave their
    // setmaxnreg.inc waiting for ever.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(BwdTiles<kD>::kProducerRegs));
    if (warp != 0 || lane != 0) return;  // one thread issues every load
    int g = 0;   // query tiles loaded before this key tile's
    int kt = 0;  // key tiles before this one
    for (int i = kPersistent ? blockIdx.x : 0; i < num_tiles; ++kt) {
      const KeyTile t = tile_of(i);
      if (kt > 0) mbar_wait(&sm.kv_empty, (kt - 1) & 1);  // the last GEMMs read K and V
      sm.tile = i;  // released to the consumers by the arrival on kv_full
      mbar_arrive_expect_tx(&sm.kv_full, sizeof(sm.k) + sizeof(sm.v));
      tma_load_tile<kBN, kD>(sm.k, &maps.k, t.hk, t.k0, t.b, &sm.kv_full);
      tma_load_tile<kBN, kD>(sm.v, &maps.v, t.hk, t.k0, t.b, &sm.kv_full);
      for (int it = 0; it < t.iters; ++it) {
        const int c = g + it, stage = c % kStages;
        if (c >= kStages) mbar_wait(&sm.empty[stage], (c / kStages - 1) & 1);
        const int h = t.hk * G + it / t.n_m, q0 = (t.m_first + it % t.n_m) * kBM;
        mbar_arrive_expect_tx(&sm.full[stage], sizeof(sm.q[0]) + sizeof(sm.dout[0]) +
                                                   sizeof(sm.lse2[0]) + sizeof(sm.delta[0]));
        tma_load_tile<kBM, kD>(sm.q[stage], &maps.q, h, q0, t.b, &sm.full[stage]);
        tma_load_tile<kBM, kD>(sm.dout[stage], &maps.dout, h, q0, t.b, &sm.full[stage]);
        tma_load_2d(sm.lse2[stage], &maps.lse2, q0, t.b * H + h, &sm.full[stage]);
        tma_load_2d(sm.delta[stage], &maps.delta, q0, t.b * H + h, &sm.full[stage]);
      }
      g += t.iters;
      i = kPersistent ? static_cast<int>(gridDim.x) + atomicAdd(next_tile, 1) : num_tiles;
    }
    if (kPersistent) {  // none left: the consumers stop at the next kv_full
      if (kt > 0) mbar_wait(&sm.kv_empty, (kt - 1) & 1);
      sm.tile = -1;
      mbar_arrive(&sm.kv_full);
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(BwdTiles<kD>::kConsumerRegs));
  const int wg = warpgroup - 1;                      // this consumer's keys: k0 + 64 wg + [0, 64)
  const int row_lo = wg * 64 + warp * 16 + lane / 4;  // the thread's tile rows: row_lo, row_lo + 8
  // A operands of S^T and dP^T: row 64 wg of every column block of K, V (kmajor_desc<kBN> steps
  // across the column blocks). This warpgroup's block of dQ: queries 64 dq_qb + [0, 64) (A: that
  // column block of the dS^T tile), channels 64 dq_cb + [0, 64) (B: that column block of K).
  const uint32_t uK = smem_u32(sm.k + wg * 64 * 64), uV = smem_u32(sm.v + wg * 64 * 64);
  const int dq_qb = wg % BwdTiles<kD>::kQBlocks, dq_cb = wg / BwdTiles<kD>::kQBlocks;
  constexpr bool kPipelined = BwdTiles<kD>::kPipelined;
  const uint32_t uKcols = smem_u32(sm.k + dq_cb * kBN * 64);
  int g = 0;  // query tiles of this CTA's earlier key tiles
  for (int kt = 0; kPersistent || kt == 0; ++kt) {
    mbar_wait(&sm.kv_full, kt & 1);
    const int tile = sm.tile;
    if (kPersistent && tile < 0) break;
    const KeyTile t = tile_of(tile);
    const int hk = t.hk, b = t.b;
    const int key_lo = t.k0 + row_lo;
    const int warp_key0 = t.k0 + wg * 64 + warp * 16;  // the warp's keys: warp_key0 + [0, 16)
    float bias[2];  // mask · log2 e of the thread's keys
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int key = key_lo + 8 * hh;
      bias[hh] = (p.mask && key < T) ? p.mask[(static_cast<long>(b) * T + key) * Hkv + hk] * kLog2e
                                     : 0.f;
    }
    if (p.exclude_ctrl) {  // zero the control channel of the warpgroup's K rows
      if (threadIdx.x % 128 < 64)
        sm.k[swizzled<kBN>(wg * 64 + threadIdx.x % 128, kD - 1)] = __float2bfloat16(0.f);
      fence_proxy_async();  // read next by the tensor cores
      named_barrier<128>(kBarKZeroed + wg);
    }

    float dk[kD / 2], dv[kD / 2], dm[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;
    pin(dk);  // zeroed before the first wgmma (ptxas serialises them otherwise, C7515)
    pin(dv);

    // dS^T as A fragments. Under kPipelined the dK GEMM that reads them is still running when the
    // loop comes round, so they live across it.
    uint32_t da[kBM / 16][4];
    float dq[32];                 // kPipelined: one home across the loop for the dQ issued in it
    int prev_q0 = 0, prev_h = 0;  // kPipelined: the previous tile's, whose dQ is issued a tile late
    // This warpgroup's block of dQ = dS K (above) for tile c, from that tile's dS^T buffer
    auto issue_dq = [&](float (&acc)[32], int c) {
      const uint32_t uDs = smem_u32(sm.ds[c % BwdTiles<kD>::kDsBuffers] + dq_qb * kBN * 64);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_ss<64, 1, 1>(acc, nmajor_desc<kBN>(uDs, kk), nmajor_desc<kBN>(uKcols, kk), kk > 0);
      wgmma_commit();
    };
    for (int it = 0; it < t.iters; ++it) {
      const int c = g + it, stage = c % kStages;
      const int h = hk * G + it / t.n_m, q0 = (t.m_first + it % t.n_m) * kBM;
      const uint32_t uQ = smem_u32(sm.q[stage]), uO = smem_u32(sm.dout[stage]);
      const bool edge = !(q0 > warp_key0 + 15 + p.window && q0 + kBM <= T);

      float s[kBM / 2], dp[kBM / 2];
      mbar_wait(&sm.full[stage], (c / kStages) & 1);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
        wgmma_ss<kBM>(s, kmajor_desc<kBN>(uK, kk), kmajor_desc<kBM>(uQ, kk), kk > 0);
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
        wgmma_ss<kBM>(dp, kmajor_desc<kBN>(uV, kk), kmajor_desc<kBM>(uO, kk), kk > 0);
      wgmma_commit();
      wgmma_wait<1>();  // S^T landed (and the previous tile's dK); dP^T may still run
      pin(s);
      if constexpr (kPipelined) {
        if (it > 0) {
          pin(dk);
          pin(da);
          mbar_arrive(&sm.empty[(c - 1) % kStages]);  // the previous tile's Q is no longer read
        }
      }
      if (edge)
        probabilities<kBM, true>(s, sm.lse2[stage], bias, key_lo, q0, p);
      else
        probabilities<kBM, false>(s, sm.lse2[stage], bias, key_lo, q0, p);
      wgmma_wait<0>();
      pin(dp);
      if (edge)
        score_grads<kBM, true>(dp, s, sm.delta[stage], dm, key_lo, q0, p);
      else
        score_grads<kBM, false>(dp, s, sm.delta[stage], dm, key_lo, q0, p);

      uint32_t pa[kBM / 16][4];  // P^T as A fragments (kept until the dV GEMM is waited for)
      pack_a_fragments<kBM>(pa, s);
      pack_a_fragments<kBM>(da, dp);
      store_ds<kBM>(sm.ds[c % BwdTiles<kD>::kDsBuffers], da, row_lo);
      fence_proxy_async();  // read next by the tensor cores
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk)
        wgmma_rs_nmajor<kD>(dv, pa[kk], nmajor_desc<kBM>(uO, kk));
      if constexpr (kPipelined) {
        wgmma_commit();
        // The previous tile's dQ, from buffer (c - 1) % 3. The key tile's first has none, but
        // issues it all the same, from whatever that buffer holds, and drops the result: ptxas
        // serialises every wgmma around a conditional one (C7512/C7515), which costs far more
        // than one dQ GEMM a key tile. No warpgroup writes that buffer before this one's arrival
        // of tile c.
        if (it > 0) named_barrier<256>(ds_ready_barrier(wg, c - 1));
        issue_dq(dq, c + BwdTiles<kD>::kDsBuffers - 1);
#pragma unroll
        for (int kk = 0; kk < kBM / 16; ++kk)
          wgmma_rs_nmajor<kD>(dk, da[kk], nmajor_desc<kBM>(uQ, kk));
        wgmma_commit();
        wgmma_wait<1>();  // dV (and the previous tile's dQ) landed; dK runs on
        pin(dv);
        pin(pa);
        if (it > 0) {
          pin(dq);
          add_dq<kD>(sm.dq[threadIdx.x / 32 - 4][0], dq, prev_q0 + 64 * dq_qb, 64 * dq_cb, b,
                     prev_h, &maps.dq_acc, p);
        }
        named_barrier_arrive<256>(ds_ready_barrier(1 - wg, c));
        prev_q0 = q0;
        prev_h = h;
      } else {
#pragma unroll
        for (int kk = 0; kk < kBM / 16; ++kk)
          wgmma_rs_nmajor<kD>(dk, da[kk], nmajor_desc<kBM>(uQ, kk));
        wgmma_commit();
        named_barrier<256>(kBarDsStored);
        float dq[32];
        issue_dq(dq, c);
        wgmma_wait<0>();
        pin(dv);
        pin(dk);
        pin(dq);
        if (it + 1 == t.iters) mbar_arrive(&sm.kv_empty);  // K and V are no longer read
        mbar_arrive(&sm.empty[stage]);  // Q, dO and the rows of this stage are no longer read
        add_dq<kD>(sm.dq[threadIdx.x / 32 - 4][0], dq, q0 + 64 * dq_qb, 64 * dq_cb, b, h,
                   &maps.dq_acc, p);
      }
    }
    if constexpr (kPipelined) {  // the last tile's dQ, and its dK
      const int last = g + t.iters - 1;
      named_barrier<256>(ds_ready_barrier(wg, last));
      issue_dq(dq, last);
      wgmma_wait<0>();
      pin(dk);
      pin(da);
      pin(dq);
      mbar_arrive(&sm.kv_empty);                  // K and V are no longer read
      mbar_arrive(&sm.empty[last % kStages]);     // nor the last tile's Q
      add_dq<kD>(sm.dq[threadIdx.x / 32 - 4][0], dq, prev_q0 + 64 * dq_qb, 64 * dq_cb, b, prev_h,
                 &maps.dq_acc, p);
    }

    // dmask: each key's sum lies spread over the 4 lanes of its quad
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      dm[hh] += __shfl_xor_sync(0xffffffffu, dm[hh], 1);
      dm[hh] += __shfl_xor_sync(0xffffffffu, dm[hh], 2);
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int key = key_lo + 8 * hh;
      if (key >= T) continue;
      if (p.dmask && (lane % 4) == 0) {
        float& dst = p.dmask[(static_cast<long>(b) * T + key) * Hkv + hk];
        dst = (p.accumulate ? dst : 0.f) + dm[hh];
      }
      const long off = ((static_cast<long>(b) * T + key) * Hkv + hk) * kD;
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        const int c = j * 8 + 2 * (lane % 4);
        const float dk0 = dk[4 * j + 2 * hh] * p.scale;
        const float dk1 =
            p.exclude_ctrl && c + 1 == kD - 1 ? 0.f : dk[4 * j + 2 * hh + 1] * p.scale;
        __nv_bfloat162* pk = reinterpret_cast<__nv_bfloat162*>(p.dk + off + c);
        const float2 ok = p.accumulate ? __bfloat1622float2(*pk) : make_float2(0.f, 0.f);
        *pk = __floats2bfloat162_rn(ok.x + dk0, ok.y + dk1);
        __nv_bfloat162* pv = reinterpret_cast<__nv_bfloat162*>(p.dv + off + c);
        const float2 ov = p.accumulate ? __bfloat1622float2(*pv) : make_float2(0.f, 0.f);
        *pv = __floats2bfloat162_rn(ov.x + dv[4 * j + 2 * hh], ov.y + dv[4 * j + 2 * hh + 1]);
      }
    }
    g += t.iters;
  }
  // the staging buffer must outlive the last reduce-adds' reads of it (the CTA's shared memory
  // goes with its exit); waiting for their completion costs no more at this point
  if (lane == 0) bulk_wait<0>();
}

// Tensor map of the rows of a [rows][T] fp32 matrix whose rows lie stride floats apart (16-byte
// multiples); a box is one row's kBM positions from a tile's first query, zeros past T.
template <int kBM>
CUtensorMap make_row_map(const float* base, long rows, int T, int stride, const char* what) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {sizeof(float) * static_cast<cuuint64_t>(stride)};
  const cuuint32_t box[2] = {kBM, 1};
  return encode_tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, base, dims, strides, box,
                           CU_TENSOR_MAP_SWIZZLE_NONE, what);
}

// Tensor map of the fp32 dQ accumulator [B, T, H, D], dimensions innermost first {D, H, T, B}; a
// box is 32 channels (128 bytes, the widest a 128-byte swizzle takes) x 1 head x 16 queries (a
// warp's rows of the dQ block) x 1 sequence.
CUtensorMap make_dq_map(float* dq_acc, int B, int T, int H, int D) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(H),
                              static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(B)};
  const cuuint64_t elem = sizeof(float);
  const cuuint64_t strides[3] = {elem * D, elem * D * H, elem * D * H * T};
  const cuuint32_t box[4] = {32, 1, 16, 1};
  return encode_tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, dq_acc, dims, strides, box,
                           CU_TENSOR_MAP_SWIZZLE_128B, "the fp32 dQ accumulator");
}

template <int D, bool kPersistent>
void launch_bwd(float* dq_acc, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                const float* lse2, const float* delta, const BwdParams& p, cudaStream_t stream) {
  constexpr int kBM = BwdTiles<D>::kBM;
  const size_t smem = 1024 + sizeof(BwdSmem<D>);
  allow_dynamic_smem<attn_bwd_sm90_kernel<D, kPersistent>>(smem);
  const long stat_rows = static_cast<long>(p.B) * p.H;
  const int stats_stride = attention_stats_stride(p.T);
  const BwdMaps maps{make_tile_map(q, p.B, p.T, p.H, D, kBM),
                     make_tile_map(k, p.B, p.T, p.Hkv, D, kBN),
                     make_tile_map(v, p.B, p.T, p.Hkv, D, kBN),
                     make_tile_map(dout, p.B, p.T, p.H, D, kBM),
                     make_row_map<kBM>(lse2, stat_rows, p.T, stats_stride, "lse2"),
                     make_row_map<kBM>(delta, stat_rows, p.T, stats_stride, "Delta"),
                     make_dq_map(dq_acc, p.B, p.T, p.H, D)};
  const int ntiles = ceil_div(p.T, kBN);
  if (!kPersistent) {
    attn_bwd_sm90_kernel<D, false>
        <<<dim3(ntiles, p.Hkv, p.B), kThreads, smem, stream>>>(maps, p, nullptr, 0);
    DMC_CUDA_CHECK_LAUNCH();
    return;
  }
  int* next_tile = persistent_counter(kScratchAttentionBwdTileCounter, stream);
  const int heads = p.B * p.Hkv;
  // Q and dO bytes a KV head's key tiles read (its group's G query heads)
  const int section =
      persistent_section(static_cast<long>(p.T) * D * 2 * sizeof(bf16) * (p.H / p.Hkv), heads,
                         kBackwardSectionBytes);
  const int grid = std::min(ntiles * heads, num_sms());
  attn_bwd_sm90_kernel<D, true><<<grid, kThreads, smem, stream>>>(maps, p, next_tile, section);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void dmc_attention_backward_sm90(float* dq_acc, bf16* dk, bf16* dv, float* dmask,
                                 const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                 const float* mask, const float* lse2, const float* delta, int B,
                                 int T, int H, int Hkv, int D, bool exclude_ctrl, float scale,
                                 bool accumulate, cudaStream_t stream, int mask_window,
                                 bool persistent) {
  if (!device_is_sm90()) {
    std::fprintf(stderr, "dmc_attention_backward: the sm90 kernel needs a Hopper (sm_90) GPU\n");
    std::abort();
  }
  const BwdParams p{mask, dk, dv, dmask, B, T, H, Hkv, scale, scale * kLog2e, exclude_ctrl,
                    mask_window, accumulate};
  const auto launch = D == 64 ? (persistent ? launch_bwd<64, true> : launch_bwd<64, false>)
                              : (persistent ? launch_bwd<128, true> : launch_bwd<128, false>);
  launch(dq_acc, q, k, v, dout, lse2, delta, p, stream);
}

}  // namespace dmc::cuda
