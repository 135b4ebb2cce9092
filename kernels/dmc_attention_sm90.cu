// Fused DMC attention forward for Hopper (sm_90a; spec: kernels/dmc_attention.h). The computation
// of kernels/dmc_attention.cu's forward (online softmax in base 2, the DMC bias of each key added
// on the fly, lse saved for the backward) on Hopper's warpgroup MMA: wgmma multiplies a 64-row
// tile per warpgroup (4 warps), with S = Q K^T taking both operands from shared memory and
// O += P V taking P from registers (the S accumulators, rounded to bf16) and V from shared memory.
//
// Shared-memory tiles are stored as the tensor cores read them with 128-byte swizzling: a
// [rows][D] bf16 tile is D/64 column blocks of [rows][64] (128 bytes a row), and within every
// 8-row, 1024-byte atom the 16-byte chunk c of row r sits at chunk c ^ (r % 8). The tile base is
// 1024-byte aligned. A matrix descriptor then walks it: Q and K are "K-major" (the reduction
// dimension, channels, is contiguous), so a 16-channel step moves 32 bytes along the row within a
// column block; V is "N-major" for O += P V (its rows are the reduction dimension, keys), so a
// 16-key step moves 2 atoms down, and the descriptor's leading offset jumps between its column
// blocks.
//
// The tiles arrive by TMA (cp.async.bulk.tensor, which writes this swizzle itself) on mbarriers,
// issued by a producer warp ahead of two consumer warpgroups (the kernel's comment below), the
// arrangement of FlashAttention-3's forward. exclude_ctrl: channel D-1 of the Q tile is zeroed in
// shared memory once, so it drops out of every score.
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes via the runtime)
#include <cudaTypedefs.h>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "kernels/dmc_attention_sm90.cu uses sm_90a instructions (wgmma): build it for sm_90a only"
#endif

namespace dmc::cuda {
namespace {
using namespace detail;

// ---------------------------------------------------------------- wgmma wrappers
// Descriptor of a 128-byte-swizzled shared-memory operand (PTX ISA, "matrix descriptor"): start
// address, leading and stride byte offsets in 16-byte units, swizzle mode 1 (128 bytes).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lead_bytes,
                                              uint32_t stride_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         static_cast<uint64_t>(lead_bytes >> 4) << 16 |
         static_cast<uint64_t>(stride_bytes >> 4) << 32 | 1ull << 62;
}
// K-major operand of R rows (Q, K): the 16-channel step kk is 32 bytes into the row of column
// block kk / 4; the stride offset is one 8-row atom, the leading offset unused with swizzling.
template <int R>
__device__ __forceinline__ uint64_t kmajor_desc(uint32_t tile, int kk) {
  return smem_desc(tile + (kk / 4) * R * 128 + (kk % 4) * 32, 16, 1024);
}
// N-major operand of R rows (V as B of P V): the 16-key step kk is two atoms down; the leading
// offset is the next column block of 64 channels, the stride offset the next 8 keys.
template <int R>
__device__ __forceinline__ uint64_t nmajor_desc(uint32_t tile, int kk) {
  return smem_desc(tile + kk * 2048, R * 128, 1024);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ties accumulator registers to this point of the program: reads after a wgmma_wait stay after it.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#define DMC_ACC8(i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define DMC_ACC32 DMC_ACC8(0), DMC_ACC8(8), DMC_ACC8(16), DMC_ACC8(24)
#define DMC_ACC64 DMC_ACC32, DMC_ACC8(32), DMC_ACC8(40), DMC_ACC8(48), DMC_ACC8(56)
#define DMC_REGS32                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define DMC_REGS64                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "   \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "    \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "    \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 x N, fp32) = (accumulate ? d : 0) + A B, A (64 x 16) and B (16 x N) K-major in shared
// memory. Accumulator layout (per warp w of the warpgroup, as mma.sync's m16n8): d[4j + e] is row
// 16w + lane/4 + 8(e/2), column 8j + 2(lane%4) + e%2.
template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b,
                                         bool accumulate);
template <>
__device__ __forceinline__ void wgmma_ss<128>(float (&d)[64], uint64_t a, uint64_t b,
                                              bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " DMC_REGS64
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : DMC_ACC64
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}
// d (64 x N) += A B, A (64 x 16 bf16) in registers in mma.sync's m16n8k16 A-fragment layout per
// warp, B (16 x N) N-major in shared memory (the transposed read).
template <int N>
__device__ __forceinline__ void wgmma_rs_nmajor(float (&d)[N / 2], const uint32_t (&a)[4],
                                                uint64_t b);
template <>
__device__ __forceinline__ void wgmma_rs_nmajor<64>(float (&d)[32], const uint32_t (&a)[4],
                                                    uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " DMC_REGS32
               ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
               : DMC_ACC32
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
template <>
__device__ __forceinline__ void wgmma_rs_nmajor<128>(float (&d)[64], const uint32_t (&a)[4],
                                                     uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " DMC_REGS64
               ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
               : DMC_ACC64
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
#undef DMC_ACC8
#undef DMC_ACC32
#undef DMC_ACC64
#undef DMC_REGS32
#undef DMC_REGS64

// Makes this thread's ordinary shared-memory writes visible to the tensor cores (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---------------------------------------------------------------- the warpgroup's tile step
struct FwdParams {  // q, k and v reach the kernel as tensor maps
  const float* mask;
  bf16* out;
  float* lse;
  int B, T, H, Hkv;
  float scale_log2;
  bool exclude_ctrl;
  int window;  // the mask applies where query - key > window (DMC: 0; DMS: w)
};

// Element offset of (row, col) in a swizzled [R][D] tile (see the top of the file).
template <int R>
__device__ __forceinline__ int swizzled(int row, int col) {
  return (col / 64) * R * 64 + row * 64 + ((((col % 64) / 8) ^ (row & 7)) << 3) + col % 8;
}

// Issues S = Q K^T for the warpgroup's 64 query rows (at q, in a Q tile of QR rows) and BN keys.
template <int D, int BN, int QR>
__device__ __forceinline__ void issue_scores(float (&s)[BN / 2], uint32_t q, uint32_t k) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_ss<BN>(s, kmajor_desc<QR>(q, kk), kmajor_desc<BN>(k, kk), kk > 0);
}

// Issues O += P V: P as bf16 A fragments (pack_probabilities), V the BN-key tile at v.
template <int D, int BN>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[BN / 16][4],
                                         uint32_t v) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_nmajor<D>(o, pa[kk], nmajor_desc<BN>(v, kk));
}

// The probabilities in s rounded to bf16, laid out as A fragments of the 16-key steps: the S
// accumulator layout is the A-fragment layout, two columns per register.
template <int BN>
__device__ __forceinline__ void pack_probabilities(uint32_t (&pa)[BN / 16][4],
                                                   const float (&s)[BN / 2]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) pa[kk][r] = pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

// Online softmax over one tile for the thread's rows row and row + 8: scale, the DMC bias
// (bias[key] where query - key > window), causal and tail masks (edge tiles only), the running
// maximum m and sum l (base 2); s becomes the unnormalised probabilities and corr the factor by
// which O must be rescaled before this tile's P V is added (rescale_rows). Does not touch O, so
// it may run while the previous tile's P V is still in the tensor cores.
template <int BN>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 2], float (&m)[2], float (&l)[2],
                                             float (&corr)[2], const float* bias, int kbase,
                                             int row, bool edge, const FwdParams& p) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const float2 mk = *reinterpret_cast<const float2*>(bias + j * 8 + 2 * (lane % 4));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float& x = s[4 * j + e];
      const float b = (e & 1) ? mk.y : mk.x;
      if (!edge) {
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

// out = O / l and lse = (m + log2 l) ln 2 for the thread's rows row, row + 8 of head h. Every row
// sees its own key unmasked, so l > 0.
template <int D>
__device__ __forceinline__ void store_rows(const float (&o)[D / 2], const float (&m)[2],
                                           float (&l)[2], int row, int b, int h,
                                           const FwdParams& p) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    const int r = row + hh * 8;
    if (r >= p.T) continue;
    const float inv = 1.f / l[hh];
    bf16* orow = p.out + (static_cast<long>(b) * p.T + r) * p.H * D + static_cast<long>(h) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(orow + j * 8 + 2 * (lane % 4)) =
          __floats2bfloat162_rn(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
    if ((lane % 4) == 0 && p.lse)
      p.lse[(static_cast<long>(b) * p.H + h) * p.T + r] = (m[hh] + log2f(l[hh])) * kLn2;
  }
}

// ---------------------------------------------------------------- TMA and mbarriers
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
// Announces bytes that copies will deliver in the current phase (no arrival).
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Waits until the phase of the given parity (0 for the first completion, 1 for the second, ...)
// has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
}
// One box of a 4-D tensor map ({channel, head, position, batch}, see make_tile_map) into shared
// memory, completing on bar.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int c, int h, int t,
                                         int b, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(c), "r"(h), "r"(t), "r"(b), "r"(smem_u32(bar))
      : "memory");
}
template <int N>
__device__ __forceinline__ void named_barrier(int id) {  // the N threads that name barrier id
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(N) : "memory");
}

// ---------------------------------------------------------------- the kernel
// CTA = 3 warpgroups, 128 queries of one head. Warpgroup 0 is the producer: one warp issues the
// TMA loads of the Q tile and of the K and V tiles (kStages deep) and writes each tile's bias row;
// the other warpgroups are consumers, each owning 64 query rows, running scores -> softmax -> P V
// per tile (the softmax of one tile overlapping the tensor cores' work on the next) and handing
// each stage back once its P V has landed. Registers move from the producer to the consumers
// (setmaxnreg), which hold S and O in registers.
// Barriers per stage: k_full (K landed and the bias written), v_full (V landed), empty (every
// consumer thread is done with the stage); q_full for the Q tile.
constexpr int kBM = 128, kBN = 128, kThreads = 384;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128·40 + 256·232 <= 64K registers

template <int D>
struct Smem {
  static constexpr int kStages = D == 64 ? 3 : 2;
  bf16 q[kBM * D];
  bf16 k[kStages][kBN * D];
  bf16 v[kStages][kBN * D];
  float bias[kStages][kBN];  // mask[key] · log2 e
  uint64_t q_full, k_full[kStages], v_full[kStages], empty[kStages];
};

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_sm90_kernel(const __grid_constant__ CUtensorMap q_map,
                         const __grid_constant__ CUtensorMap k_map,
                         const __grid_constant__ CUtensorMap v_map, const FwdParams p) {
  constexpr int kStages = Smem<D>::kStages;
  extern __shared__ unsigned char smem_raw[];
  // the swizzle atoms must be 1024-byte aligned in the shared address space
  Smem<D>& sm = *reinterpret_cast<Smem<D>*>(smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024);

  const int T = p.T, Hkv = p.Hkv;
  const int mt = gridDim.x - 1 - blockIdx.x;  // longest rows of the head first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.H / Hkv);
  const int q0 = mt * kBM;
  const int ntiles = (min(T, q0 + kBM) + kBN - 1) / kBN;
  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    mbar_init(&sm.q_full, 1);
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&sm.k_full[i], 1);
      mbar_init(&sm.v_full[i], 1);
      mbar_init(&sm.empty[i], kThreads - 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (warp != 0) return;
    const float* mb = p.mask ? p.mask + static_cast<long>(b) * T * Hkv + hk : nullptr;
    if (lane == 0) {
      mbar_arrive_expect_tx(&sm.q_full, sizeof(sm.q));
      for (int c = 0; c < D / 64; ++c) tma_load(sm.q + c * kBM * 64, &q_map, c * 64, h, q0, b, &sm.q_full);
    }
    for (int n = 0; n < ntiles; ++n) {
      const int stage = n % kStages;
      if (n >= kStages) mbar_wait(&sm.empty[stage], (n / kStages - 1) & 1);
      if (lane == 0) {
        mbar_expect_tx(&sm.k_full[stage], sizeof(sm.k[0]));
        for (int c = 0; c < D / 64; ++c)
          tma_load(sm.k[stage] + c * kBN * 64, &k_map, c * 64, hk, n * kBN, b, &sm.k_full[stage]);
        mbar_arrive_expect_tx(&sm.v_full[stage], sizeof(sm.v[0]));
        for (int c = 0; c < D / 64; ++c)
          tma_load(sm.v[stage] + c * kBN * 64, &v_map, c * 64, hk, n * kBN, b, &sm.v_full[stage]);
      }
      // the bias row: mask values lie Hkv apart, too sparse for a TMA box
#pragma unroll
      for (int i = lane; i < kBN; i += 32) {
        const int key = n * kBN + i;
        sm.bias[stage][i] = (mb && key < T) ? mb[static_cast<long>(key) * Hkv] * kLog2e : 0.f;
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&sm.k_full[stage]);
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int wg = warpgroup - 1;  // this consumer's rows: q0 + 64 wg + [0, 64)
  mbar_wait(&sm.q_full, 0);
  if (p.exclude_ctrl) {  // zero the control channel of the warpgroup's Q rows
    if (threadIdx.x % 128 < 64) {
      const int r = wg * 64 + threadIdx.x % 128;
      sm.q[swizzled<kBM>(r, D - 1)] = __float2bfloat16(0.f);
    }
    fence_proxy_async();  // read next by the tensor cores
    named_barrier<128>(1 + wg);
  }

  const int wrow0 = q0 + wg * 64 + warp * 16;  // first row of this warp
  const int row = wrow0 + lane / 4;            // the thread's rows: row, row + 8
  const uint32_t uQ = smem_u32(sm.q + wg * 64 * 64);  // row 64 wg of every column block
  float o[D / 2], s[kBN / 2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, corr[2];
  uint32_t pa[kBN / 16][4];  // P of the tile whose P V is next
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  // S of tile n, masked per warp where its keys reach the band or past T
  auto softmax_of = [&](int n) {
    const int kbase = n * kBN;
    const bool edge = kbase + kBN - 1 + p.window >= wrow0 || kbase + kBN > T;
    softmax_tile<kBN>(s, m, l, corr, sm.bias[n % kStages], kbase, row, edge, p);
  };

  // FlashAttention-3's in-warpgroup overlap: the tensor cores compute S of tile n and P V of tile
  // n - 1 while the warpgroup runs the softmax of tile n; O is rescaled once P V has landed.
  mbar_wait(&sm.k_full[0], 0);
  wgmma_fence();
  issue_scores<D, kBN, kBM>(s, uQ, smem_u32(sm.k[0]));
  wgmma_commit();
  wgmma_wait<0>();
  pin(s);
  softmax_of(0);
  pack_probabilities<kBN>(pa, s);
  for (int n = 1; n < ntiles; ++n) {
    const int stage = n % kStages, prev = (n - 1) % kStages;
    mbar_wait(&sm.k_full[stage], (n / kStages) & 1);
    wgmma_fence();
    issue_scores<D, kBN, kBM>(s, uQ, smem_u32(sm.k[stage]));
    wgmma_commit();
    mbar_wait(&sm.v_full[prev], ((n - 1) / kStages) & 1);
    wgmma_fence();
    issue_pv<D, kBN>(o, pa, smem_u32(sm.v[prev]));
    wgmma_commit();
    wgmma_wait<1>();  // S of tile n; P V of tile n - 1 may still run
    pin(s);
    softmax_of(n);
    wgmma_wait<0>();
    pin(o);
    mbar_arrive(&sm.empty[prev]);
    rescale_rows<D>(o, corr);
    pack_probabilities<kBN>(pa, s);
  }
  const int last = (ntiles - 1) % kStages;
  mbar_wait(&sm.v_full[last], ((ntiles - 1) / kStages) & 1);
  wgmma_fence();
  issue_pv<D, kBN>(o, pa, smem_u32(sm.v[last]));
  wgmma_commit();
  wgmma_wait<0>();
  pin(o);
  mbar_arrive(&sm.empty[last]);
  store_rows<D>(o, m, l, row, b, h, p);
}

// The driver's tensor-map encoder, reached through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    DMC_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
      std::fprintf(stderr, "dmc_attention_forward: the driver has no cuTensorMapEncodeTiled\n");
      std::abort();
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// Tensor map of a [B, T, heads, D] bf16 tensor, dimensions innermost first {D, heads, T, B}; a box
// is 64 channels x 1 head x rows positions x 1 sequence, 128-byte swizzled: one column block of a
// tile. Positions past T (within the sequence) arrive as zeros.
CUtensorMap make_tile_map(const bf16* base, int B, int T, int heads, int D, int rows) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[3] = {sizeof(bf16) * D, sizeof(bf16) * D * heads,
                                 sizeof(bf16) * D * heads * T};  // bytes, dimensions 1..3
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(rows), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<bf16*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr,
                 "dmc_attention_forward: cuTensorMapEncodeTiled failed (error %d) for a "
                 "[%d, %d, %d, %d] tensor (16-byte aligned?)\n",
                 static_cast<int>(r), B, T, heads, D);
    std::abort();
  }
  return map;
}

template <int D>
void launch_fwd(const bf16* q, const bf16* k, const bf16* v, const FwdParams& p,
                cudaStream_t stream) {
  const size_t smem = 1024 + sizeof(Smem<D>);
  auto kernel = attn_fwd_sm90_kernel<D>;
  static bool configured = false;
  if (!configured) {
    DMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    configured = true;
  }
  const CUtensorMap q_map = make_tile_map(q, p.B, p.T, p.H, D, kBM);
  const CUtensorMap k_map = make_tile_map(k, p.B, p.T, p.Hkv, D, kBN);
  const CUtensorMap v_map = make_tile_map(v, p.B, p.T, p.Hkv, D, kBN);
  dim3 grid(ceil_div(p.T, kBM), p.H, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(q_map, k_map, v_map, p);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void dmc_attention_forward_sm90(bf16* out, float* lse, const bf16* q, const bf16* k,
                                const bf16* v, const float* mask, int B, int T, int H, int Hkv,
                                int D, bool exclude_ctrl, float scale, cudaStream_t stream,
                                int mask_window) {
  if (!device_is_sm90()) {
    std::fprintf(stderr, "dmc_attention_forward: the sm90 kernel needs a Hopper (sm_90) GPU\n");
    std::abort();
  }
  const FwdParams p{mask, out, lse, B, T, H, Hkv, scale * kLog2e, exclude_ctrl, mask_window};
  if (D == 64)
    launch_fwd<64>(q, k, v, p, stream);
  else
    launch_fwd<128>(q, k, v, p, stream);
}

}  // namespace dmc::cuda
