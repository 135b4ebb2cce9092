// Fused DMC attention forward for Hopper (sm_90a; spec: kernels/dmc_attention.h). The computation
// of kernels/dmc_attention.cu's forward (online softmax in base 2, the DMC bias of each key added
// on the fly, lse saved for the backward) on Hopper's warpgroup MMA: wgmma multiplies a 64-row
// tile per warpgroup (4 warps), with S = Q K^T taking both operands from shared memory and
// O += P V taking P from registers (the S accumulators, rounded to bf16) and V from shared memory.
//
// Shared-memory tiles are stored as the tensor cores read them, 128-byte swizzled (the layout and
// the descriptors that walk it: kernels/wgmma_sm90.h): Q and K are K-major operands of S = Q K^T,
// V an N-major operand of O += P V.
//
// What arrives how. The tiles arrive by TMA (cp.async.bulk.tensor, which writes this swizzle
// itself) on mbarriers, issued by one producer thread ahead of two consumer warpgroups (the
// kernel's comment below), the arrangement of FlashAttention-3's forward. Each key tile's DMC bias
// row arrives with it, on the same barrier, as one plain bulk copy (cp.async.bulk) of 512 bytes:
// in the mask's [B, T, Hkv] layout a head's values lie Hkv floats apart, so a pre-pass
// (bias_rows_kernel) writes them once per call transposed, scaled by log2 e and zero-padded to
// whole tiles, [B, Hkv, T rounded up to kBN] (the attention's scratch). Read from the mask
// itself, they were 128 scattered loads per tile, 4 useful bytes of every 32-byte sector, which
// the producer had to wait for before it could hand the stage over. exclude_ctrl: channel D-1 of
// the Q tile is zeroed in shared memory once, so it drops out of every score.
//
// O leaves by TMA too: each consumer warpgroup writes its 64 normalised rows as bf16 into its own
// 64 rows of the Q tile in shared memory (only it reads them, and not after its last S GEMM; the
// persistent schedule, whose next Q tile may land there meanwhile, into a buffer of its own), in
// the swizzled layout of the output's tensor-map box, and one of its threads stores them (whole
// 128-byte lines, rows past T skipped by the TMA unit) instead of 4-byte stores rows apart from
// the registers.
#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "kernels/wgmma_sm90.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// ---------------------------------------------------------------- the warpgroup's tile step
struct FwdParams {  // q, k, v and out reach the kernel as tensor maps
  const float* bias;  // [B, Hkv, padded_keys(T)], mask · log2 e (bias_rows_kernel), or null
  float* lse;
  int B, T, H, Hkv;
  float scale_log2;
  bool exclude_ctrl;
  int window;  // the mask applies where query - key > window (DMC: 0; DMS: w)
};

// Issues S = Q K^T for the warpgroup's 64 query rows (at q, in a Q tile of QR rows) and BN keys.
template <int D, int BN, int QR>
__device__ __forceinline__ void issue_scores(float (&s)[BN / 2], uint32_t q, uint32_t k) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_ss<BN>(s, kmajor_desc<QR>(q, kk), kmajor_desc<BN>(k, kk), kk > 0);
}

// Issues O += P V: P as bf16 A fragments (pack_a_fragments), V the BN-key tile at v.
template <int D, int BN>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[BN / 16][4],
                                         uint32_t v) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_nmajor<D>(o, pa[kk], nmajor_desc<BN>(v, kk));
}

// Online softmax over one tile for the thread's rows row and row + 8: scale, the DMC bias
// (bias[key] where query - key > window), causal and tail masks (edge tiles only), the running
// maximum m and sum l (base 2); s becomes the unnormalised probabilities and corr the factor by
// which O must be rescaled before this tile's P V is added (rescale_rows). Does not touch O, so
// it may run while the previous tile's P V is still in the tensor cores. kEdge is a template
// argument, so that the caller branches once a tile: a test of edge per group of columns let the
// compiler interleave both paths' code with a branch every 8 columns, and the tiles off the edge
// (almost all) paid for the index tests too (bench/RESULTS.md, entry 35).
template <int BN, bool kEdge>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 2], float (&m)[2], float (&l)[2],
                                             float (&corr)[2], const float* bias, int kbase,
                                             int row, const FwdParams& p) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const float2 mk = *reinterpret_cast<const float2*>(bias + j * 8 + 2 * (lane % 4));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float& x = s[4 * j + e];
      const float b = (e & 1) ? mk.y : mk.x;
      if constexpr (!kEdge) {
        x = fmaf(x, p.scale_log2, b);
      } else {
        const int col = kbase + j * 8 + 2 * (lane % 4) + (e & 1);
        const int r = row + (e >> 1) * 8;
        const float y = fmaf(x, p.scale_log2, r - col > p.window ? b : 0.f);
        x = (col > r || col >= p.T) ? -INFINITY : y;
      }
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  float base[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    // A row whose keys so far are all masked (DMS's hard -inf) keeps m = -inf; it is taken as 0
    // there so that no -inf - -inf turns into NaN.
    const float m_new = fmaxf(m[h], mx[h]);
    corr[h] = m_new == -INFINITY ? 1.f : ex2(m[h] - m_new);
    m[h] = m_new;
    l[h] *= corr[h];
    base[h] = m_new == -INFINITY ? 0.f : m_new;
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    s[4 * j] = ex2(s[4 * j] - base[0]);
    s[4 * j + 1] = ex2(s[4 * j + 1] - base[0]);
    s[4 * j + 2] = ex2(s[4 * j + 2] - base[1]);
    s[4 * j + 3] = ex2(s[4 * j + 3] - base[1]);
    l[0] += s[4 * j] + s[4 * j + 1];
    l[1] += s[4 * j + 2] + s[4 * j + 3];
  }
}

template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 2], const float (&corr)[2]) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[4 * j] *= corr[0];
    o[4 * j + 1] *= corr[0];
    o[4 * j + 2] *= corr[1];
    o[4 * j + 3] *= corr[1];
  }
}

// O / l as bf16 into rows tile_row, tile_row + 8 of the swizzled [R][D] tile (the thread's rows
// row, row + 8 of the sequence), and lse = (m + log2 l) ln 2 of head h. Every row before T sees
// its own key unmasked, so l > 0 there; rows past T are not stored.
template <int D, int R>
__device__ __forceinline__ void stage_out_rows(bf16* tile, const float (&o)[D / 2],
                                               const float (&m)[2], float (&l)[2], int tile_row,
                                               int row, int b, int h, const FwdParams& p) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    const float inv = 1.f / l[hh];
    // the 8 rows of a warp's store fall into 8 different 16-byte chunks: no bank conflicts
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(tile +
                                         swizzled<R>(tile_row + hh * 8, j * 8 + 2 * (lane % 4))) =
          __floats2bfloat162_rn(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
    const int r = row + hh * 8;
    if ((lane % 4) == 0 && p.lse && r < p.T)
      p.lse[(static_cast<long>(b) * p.H + h) * p.T + r] = (m[hh] + log2f(l[hh])) * kLn2;
  }
}

// ---------------------------------------------------------------- the kernel
// CTA = 3 warpgroups, 128 queries of one head. Warpgroup 0 is the producer: one thread issues the
// TMA loads of the Q tile and of the K and V tiles (kStages deep) and the bulk copies of the K
// tiles' bias rows, and never waits on anything but the stages' barriers; the other warpgroups
// are consumers, each owning 64 query rows, running scores -> softmax -> P V per tile (the
// softmax of one tile overlapping the tensor cores' work on the next), handing K and V back as
// they finish with them, and storing their O rows by TMA (stage_out_rows). Registers move from
// the producer to the consumers (setmaxnreg), which hold S and O in registers.
// Barriers per stage: k_full (K and its bias row landed), v_full (V landed), k_empty and v_empty
// (every consumer thread is done with them); q_full for the Q tile. K is handed back once its
// tile's softmax has read the bias row, V once its P V has landed, a tile later, and the producer
// loads K a tile ahead of V, in that order. One barrier for both would free the stage of tile
// n - 1 only after P V of n - 1, which the consumers wait for just before they need tile n + 1 in
// that stage: every tile would wait out the latency of its loads; apart, each load has about a
// tile's time to land. Named barriers: kBarWarpgroup + wg (the warpgroup's own rows of the Q tile
// written: the zeroed control channel, then its O), kBarTurn + wg (the warpgroup's turn to issue
// its GEMMs: the ping-pong of the main loop).
//
// Two schedules (kPersistent). The grid one: a CTA per row tile, the longest rows of a head
// first, the heads in order; O is staged in the Q tile's rows. The persistent one: a CTA per SM,
// each taking row tiles one after another (persistent_tile's order,
// kernels/persistent_schedule.h, the next one claimed from a counter in global memory by the
// producer), so that the producer loads the next tile's Q, K and V while the consumers finish
// the current one (the Q tile is handed back by q_empty once their last S GEMM has read it), and
// no CTA launch, barrier set-up or first load is waited for between tiles; O then has a buffer
// of its own (the next Q lands in the Q tile meanwhile). At the training step's T 2048 a CTA of
// the grid schedule spends about as long starting and ending as on four or five key tiles of
// work (bench/RESULTS.md), which the persistent one overlaps.
// The stages and their barrier phases run on across a CTA's tiles: key tile n of its i-th row
// tile is the CTA's (g_i + n)-th, g_i the key tiles of its earlier row tiles.
constexpr int kBM = 128, kBN = 128, kThreads = 384;
// setmaxnreg moves registers within the CTA's allocation at launch: 128·40 + 256·232 = 384·168
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
constexpr int kBarWarpgroup = 1, kBarTurn = 3;  // 0 is __syncthreads
// Keys of a bias row: T rounded up to whole key tiles, so that every tile's row is one 512-byte
// bulk copy, 16-byte aligned.
inline __host__ __device__ int padded_keys(int T) { return (T + kBN - 1) / kBN * kBN; }

template <int D, bool kPersistent>
struct Smem {
  static constexpr int kStages = D == 64 ? 3 : 2;
  bf16 q[kBM * D];
  bf16 k[kStages][kBN * D];
  bf16 v[kStages][kBN * D];
  bf16 o[kPersistent ? kBM * D : 8];  // the persistent schedule's O rows (unused by the grid one)
  float bias[kStages][kBN];  // mask[key] · log2 e (zeros without a mask)
  uint64_t q_full, q_empty, k_full[kStages], v_full[kStages], k_empty[kStages], v_empty[kStages];
  int tile;  // the persistent schedule's current row tile (-1: none left), set with q_full
};

struct RowTile {
  int mt, h, b;  // 128 query rows from mt · kBM, of head h of sequence b
};

template <int D, bool kPersistent>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_sm90_kernel(const __grid_constant__ CUtensorMap q_map,
                         const __grid_constant__ CUtensorMap k_map,
                         const __grid_constant__ CUtensorMap v_map,
                         const __grid_constant__ CUtensorMap out_map, const FwdParams p,
                         int* next_tile, int section) {
  using S = Smem<D, kPersistent>;
  constexpr int kStages = S::kStages;
  extern __shared__ unsigned char smem_raw[];
  // the swizzle atoms must be 1024-byte aligned in the shared address space
  S& sm = *reinterpret_cast<S*>(smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024);

  const int T = p.T, Hkv = p.Hkv;
  const int mtiles = (T + kBM - 1) / kBM, heads = p.B * p.H;
  const int num_tiles = mtiles * heads;
  auto tile_of = [&](int i) -> RowTile {
    if constexpr (kPersistent) {  // the (b, h) heads, h fastest; the longest rows last in a head
      const PersistentTile w = persistent_tile(i, mtiles, heads, section);
      return {mtiles - 1 - w.rank, w.head % p.H, w.head / p.H};
    }
    return {static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x),  // longest rows first
            static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z)};
  };
  auto key_tiles = [&](const RowTile& t) { return (min(T, t.mt * kBM + kBM) + kBN - 1) / kBN; };
  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    mbar_init(&sm.q_full, 1);
    mbar_init(&sm.q_empty, kThreads - 128);
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&sm.k_full[i], 1);
      mbar_init(&sm.v_full[i], 1);
      mbar_init(&sm.k_empty[i], kThreads - 128);
      mbar_init(&sm.v_empty[i], kThreads - 128);
    }
    mbar_init_fence();
  }
  if (!p.bias)  // no mask: the bias rows stay zero, and no copy rewrites them
    for (int i = threadIdx.x; i < kStages * kBN; i += kThreads) sm.bias[i / kBN][i % kBN] = 0.f;
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (threadIdx.x != 0) return;
    int g = 0;   // key tiles loaded before this row tile's
    int it = 0;  // row tiles before this one
    for (int i = kPersistent ? blockIdx.x : 0; i < num_tiles; ++it) {
      const RowTile t = tile_of(i);
      const int hk = t.h / (p.H / Hkv), ntiles = key_tiles(t);
      const float* bias_row =
          p.bias ? p.bias + (static_cast<long>(t.b) * Hkv + hk) * padded_keys(T) : nullptr;
      if (it > 0) mbar_wait(&sm.q_empty, (it - 1) & 1);  // the last S GEMM read the Q tile
      sm.tile = i;  // released to the consumers by the arrival on q_full
      mbar_arrive_expect_tx(&sm.q_full, sizeof(sm.q));
      tma_load_tile<kBM, D>(sm.q, &q_map, t.h, t.mt * kBM, t.b, &sm.q_full);
      auto load_k = [&](int n) {  // K of tile n and its bias row
        const int c = g + n, stage = c % kStages;
        if (c >= kStages) mbar_wait(&sm.k_empty[stage], (c / kStages - 1) & 1);
        mbar_arrive_expect_tx(&sm.k_full[stage],
                              sizeof(sm.k[0]) + (bias_row ? sizeof(sm.bias[0]) : 0));
        tma_load_tile<kBN, D>(sm.k[stage], &k_map, hk, n * kBN, t.b, &sm.k_full[stage]);
        if (bias_row)
          bulk_load(sm.bias[stage], bias_row + n * kBN, sizeof(sm.bias[0]), &sm.k_full[stage]);
      };
      auto load_v = [&](int n) {
        const int c = g + n, stage = c % kStages;
        if (c >= kStages) mbar_wait(&sm.v_empty[stage], (c / kStages - 1) & 1);
        mbar_arrive_expect_tx(&sm.v_full[stage], sizeof(sm.v[0]));
        tma_load_tile<kBN, D>(sm.v[stage], &v_map, hk, n * kBN, t.b, &sm.v_full[stage]);
      };
      for (int n = 0; n < ntiles; ++n) {
        load_k(n);
        if (n > 0) load_v(n - 1);
      }
      load_v(ntiles - 1);
      g += ntiles;
      i = kPersistent ? static_cast<int>(gridDim.x) + atomicAdd(next_tile, 1) : num_tiles;
    }
    if (kPersistent) {  // none left: the consumers stop at the next q_full
      if (it > 0) mbar_wait(&sm.q_empty, (it - 1) & 1);
      sm.tile = -1;
      mbar_arrive(&sm.q_full);
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int wg = warpgroup - 1;  // this consumer's rows: q0 + 64 wg + [0, 64)
  const int other = 1 - wg;
  const uint32_t uQ = smem_u32(sm.q + wg * 64 * 64);  // row 64 wg of every column block
  // O's rows of this warpgroup: row 64 wg of every column block, 1024-byte aligned
  bf16* const out_tile = (kPersistent ? sm.o : sm.q) + wg * 64 * 64;
  int g = 0;
  for (int it = 0; kPersistent || it == 0; ++it) {
    mbar_wait(&sm.q_full, it & 1);
    const int i = sm.tile;
    if (kPersistent && i < 0) break;
    const RowTile t = tile_of(i);
    const int q0 = t.mt * kBM, ntiles = key_tiles(t);
    if (p.exclude_ctrl) {  // zero the control channel of the warpgroup's Q rows
      if (threadIdx.x % 128 < 64) {
        const int r = wg * 64 + threadIdx.x % 128;
        sm.q[swizzled<kBM>(r, D - 1)] = __float2bfloat16(0.f);
      }
      fence_proxy_async();  // read next by the tensor cores
      named_barrier<128>(kBarWarpgroup + wg);
    }

    const int wrow0 = q0 + wg * 64 + warp * 16;  // first row of this warp
    const int row = wrow0 + lane / 4;            // the thread's rows: row, row + 8
    float o[D / 2], s[kBN / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, corr[2];
    uint32_t pa[kBN / 16][4];  // P of the tile whose P V is next
#pragma unroll
    for (int j = 0; j < D / 2; ++j) o[j] = 0.f;
    // S of tile n, masked per warp where its keys reach the band or past T
    auto softmax_of = [&](int n) {
      const int kbase = n * kBN;
      const bool edge = kbase + kBN - 1 + p.window >= wrow0 || kbase + kBN > T;
      const float* bias = sm.bias[(g + n) % kStages];
      if (edge)
        softmax_tile<kBN, true>(s, m, l, corr, bias, kbase, row, p);
      else
        softmax_tile<kBN, false>(s, m, l, corr, bias, kbase, row, p);
    };

    // FlashAttention-3's two overlaps. Within the warpgroup: the tensor cores compute S of tile n
    // and P V of tile n - 1 while the warpgroup runs the softmax of tile n; O is rescaled once P V
    // has landed. Between the two consumer warpgroups (ping-pong): they take turns to issue those
    // GEMMs (kBarTurn), so one's softmax runs while the tensor cores work for the other, rather
    // than both softmaxes at once with the tensor cores idle (at head dim 64 the exponentials take
    // as long as the GEMMs). Warpgroup 0 goes first; each hands the turn over once its GEMMs are
    // issued. The turns are counted so that every barrier phase completes within the row tile:
    // warpgroup 1 gives warpgroup 0 its first turn and does not hand over after its last.
    if (wg == 1 && ntiles > 1) named_barrier_arrive<256>(kBarTurn + other);
    mbar_wait(&sm.k_full[g % kStages], (g / kStages) & 1);
    wgmma_fence();
    issue_scores<D, kBN, kBM>(s, uQ, smem_u32(sm.k[g % kStages]));
    wgmma_commit();
    wgmma_wait<0>();
    pin(s);
    if (ntiles == 1) mbar_arrive(&sm.q_empty);  // the last S GEMM has read the Q tile
    softmax_of(0);
    mbar_arrive(&sm.k_empty[g % kStages]);
    pack_a_fragments<kBN>(pa, s);
    for (int n = 1; n < ntiles; ++n) {
      const int stage = (g + n) % kStages, prev = (g + n - 1) % kStages;
      mbar_wait(&sm.k_full[stage], ((g + n) / kStages) & 1);
      named_barrier<256>(kBarTurn + wg);
      wgmma_fence();
      issue_scores<D, kBN, kBM>(s, uQ, smem_u32(sm.k[stage]));
      wgmma_commit();
      mbar_wait(&sm.v_full[prev], ((g + n - 1) / kStages) & 1);
      wgmma_fence();
      issue_pv<D, kBN>(o, pa, smem_u32(sm.v[prev]));
      wgmma_commit();
      if (wg == 0 || n + 1 < ntiles) named_barrier_arrive<256>(kBarTurn + other);
      wgmma_wait<1>();  // S of tile n; P V of tile n - 1 may still run
      pin(s);
      if (n + 1 == ntiles) mbar_arrive(&sm.q_empty);
      softmax_of(n);
      mbar_arrive(&sm.k_empty[stage]);
      wgmma_wait<0>();
      pin(o);
      mbar_arrive(&sm.v_empty[prev]);
      rescale_rows<D>(o, corr);
      pack_a_fragments<kBN>(pa, s);
    }
    const int last = (g + ntiles - 1) % kStages;
    mbar_wait(&sm.v_full[last], ((g + ntiles - 1) / kStages) & 1);
    wgmma_fence();
    issue_pv<D, kBN>(o, pa, smem_u32(sm.v[last]));
    wgmma_commit();
    wgmma_wait<0>();
    pin(o);
    mbar_arrive(&sm.v_empty[last]);
    g += ntiles;
    // The grid schedule writes O into the warpgroup's Q rows, free now that every GEMM has
    // completed; the persistent one into its O buffer, once the previous row tile's store has
    // read it.
    if (kPersistent) {
      if (threadIdx.x % 128 == 0) bulk_wait_read<0>();
      named_barrier<128>(kBarWarpgroup + wg);
    }
    stage_out_rows<D, kBM>(kPersistent ? sm.o : sm.q, o, m, l, wg * 64 + warp * 16 + lane / 4,
                           row, t.b, t.h, p);
    fence_proxy_async();  // read next by the TMA unit
    named_barrier<128>(kBarWarpgroup + wg);
    if (threadIdx.x % 128 == 0 && q0 + wg * 64 < T) {
#pragma unroll
      for (int c = 0; c < D / 64; ++c)
        tma_store(&out_map, out_tile + c * kBM * 64, c * 64, t.h, q0 + wg * 64, t.b);
      bulk_commit();
    }
  }
  if (threadIdx.x % 128 == 0) bulk_wait_read<0>();  // the shared memory must outlive the stores
}

// bias[b, hk, key] = mask[b, key, hk] · log2 e, zero for keys past T up to padded_keys(T): a
// transpose through a 32 x 32 tile in shared memory, so that both the reads (along the heads) and
// the writes (along the keys) are coalesced. Block 32 x 8, grid (padded keys / 32, Hkv / 32
// rounded up, B).
__global__ void bias_rows_kernel(float* bias, const float* mask, int T, int Hkv) {
  __shared__ float tile[32][33];  // [key][head]; the padding spares the transposed read conflicts
  const int key0 = blockIdx.x * 32, hk0 = blockIdx.y * 32, b = blockIdx.z;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int i = ty; i < 32; i += 8) {
    const int key = key0 + i, hk = hk0 + tx;
    tile[i][tx] =
        key < T && hk < Hkv ? mask[(static_cast<long>(b) * T + key) * Hkv + hk] * kLog2e : 0.f;
  }
  __syncthreads();
  for (int i = ty; i < 32; i += 8) {
    const int hk = hk0 + i, key = key0 + tx;
    if (hk < Hkv) bias[(static_cast<long>(b) * Hkv + hk) * padded_keys(T) + key] = tile[tx][i];
  }
}

template <int D, bool kPersistent>
void launch_fwd(bf16* out, const bf16* q, const bf16* k, const bf16* v, const FwdParams& p,
                cudaStream_t stream) {
  const size_t smem = 1024 + sizeof(Smem<D, kPersistent>);
  allow_dynamic_smem<attn_fwd_sm90_kernel<D, kPersistent>>(smem);
  const CUtensorMap q_map = make_tile_map(q, p.B, p.T, p.H, D, kBM);
  const CUtensorMap k_map = make_tile_map(k, p.B, p.T, p.Hkv, D, kBN);
  const CUtensorMap v_map = make_tile_map(v, p.B, p.T, p.Hkv, D, kBN);
  const CUtensorMap out_map = make_tile_map(out, p.B, p.T, p.H, D, 64);  // a warpgroup's rows
  const int mtiles = ceil_div(p.T, kBM);
  if (!kPersistent) {
    attn_fwd_sm90_kernel<D, false><<<dim3(mtiles, p.H, p.B), kThreads, smem, stream>>>(
        q_map, k_map, v_map, out_map, p, nullptr, 0);
    DMC_CUDA_CHECK_LAUNCH();
    return;
  }
  int* next_tile = persistent_counter(kScratchAttentionTileCounter, stream);
  const int heads = p.B * p.H;
  // K and V bytes per query head (a KV head's, shared by the H / Hkv heads of its group)
  const int section =
      persistent_section(static_cast<long>(p.T) * D * 2 * sizeof(bf16) * p.Hkv / p.H, heads,
                         kForwardSectionBytes);
  const int grid = std::min(mtiles * heads, num_sms());
  attn_fwd_sm90_kernel<D, true><<<grid, kThreads, smem, stream>>>(q_map, k_map, v_map, out_map, p,
                                                                  next_tile, section);
  DMC_CUDA_CHECK_LAUNCH();
}

template <int D>
void launch_fwd(bf16* out, const bf16* q, const bf16* k, const bf16* v, const FwdParams& p,
                bool persistent, cudaStream_t stream) {
  if (persistent)
    launch_fwd<D, true>(out, q, k, v, p, stream);
  else
    launch_fwd<D, false>(out, q, k, v, p, stream);
}

}  // namespace

void dmc_attention_forward_sm90(bf16* out, float* lse, const bf16* q, const bf16* k,
                                const bf16* v, const float* mask, int B, int T, int H, int Hkv,
                                int D, bool exclude_ctrl, float scale, cudaStream_t stream,
                                int mask_window, bool persistent) {
  if (!device_is_sm90()) {
    std::fprintf(stderr, "dmc_attention_forward: the sm90 kernel needs a Hopper (sm_90) GPU\n");
    std::abort();
  }
  if (D != 64 && D != 128) {
    std::fprintf(stderr, "dmc_attention_forward: the sm90 kernel takes head dims 64 and 128\n");
    std::abort();
  }
  float* bias = nullptr;
  if (mask) {
    bias = static_cast<float*>(scratch(kScratchAttentionBiasRows,
                                       sizeof(float) * size_t(B) * Hkv * padded_keys(T)));
    bias_rows_kernel<<<dim3(padded_keys(T) / 32, ceil_div(Hkv, 32), B), dim3(32, 8), 0, stream>>>(
        bias, mask, T, Hkv);
    DMC_CUDA_CHECK_LAUNCH();
  }
  const FwdParams p{bias, lse, B, T, H, Hkv, scale * kLog2e, exclude_ctrl, mask_window};
  if (D == 64)
    launch_fwd<64>(out, q, k, v, p, persistent, stream);
  else
    launch_fwd<128>(out, q, k, v, p, persistent, stream);
}

}  // namespace dmc::cuda
