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
// CTA = one warpgroup, 64 queries of one head; 64-key K/V tiles double-buffered by cp.async.
// exclude_ctrl: channel D-1 of the Q tile is zeroed in shared memory once, so it drops out of
// every score.
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
__device__ __forceinline__ void wgmma_ss<64>(float (&d)[32], uint64_t a, uint64_t b,
                                             bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " DMC_REGS32
      ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      : DMC_ACC32
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}
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
struct FwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
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

// S = Q K^T for the warpgroup's 64 query rows (at q, in a Q tile of QR rows) and BN keys.
template <int D, int BN, int QR>
__device__ __forceinline__ void scores(float (&s)[BN / 2], uint32_t q, uint32_t k) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_ss<BN>(s, kmajor_desc<QR>(q, kk), kmajor_desc<BN>(k, kk), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  pin(s);
}

// O += P V: P (the probabilities in s) rounded to bf16 A fragments, V the BN-key tile at v.
template <int D, int BN>
__device__ __forceinline__ void accumulate_pv(float (&o)[D / 2], const float (&s)[BN / 2],
                                              uint32_t v) {
  uint32_t a[BN / 16][4];
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) a[kk][r] = pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_nmajor<D>(o, a[kk], nmajor_desc<BN>(v, kk));
  wgmma_commit();
  wgmma_wait<0>();
  pin(o);
}

// Online softmax over one tile for the thread's rows row and row + 8: scale, the DMC bias
// (bias[key] where query - key > window), causal and tail masks (edge tiles only), the running
// maximum m and sum l (base 2), O rescaled; s becomes the unnormalised probabilities.
template <int D, int BN>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 2], float (&o)[D / 2], float (&m)[2],
                                             float (&l)[2], const float* bias, int kbase, int row,
                                             bool edge, const FwdParams& p) {
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
  float corr[2], base[2];
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
  for (int j = 0; j < D / 8; ++j) {
    o[4 * j] *= corr[0];
    o[4 * j + 1] *= corr[0];
    o[4 * j + 2] *= corr[1];
    o[4 * j + 3] *= corr[1];
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

// ---------------------------------------------------------------- the kernel
// rows [row0, row0 + R) of a [T][stride] global matrix into a swizzled [R][D] tile; rows past T
// are zero-filled.
template <int R, int D, int NT>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* g, int row0, int T,
                                          long stride) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < R * kChunks; i += NT) {
    const int r = i / kChunks, c = i % kChunks;
    const bool valid = row0 + r < T;
    cp_async16(tile + swizzled<R>(r, c * 8),
               valid ? g + static_cast<long>(row0 + r) * stride + c * 8 : g, valid);
  }
}

constexpr int kBM = 64, kBN = 64, kThreads = 128;

template <int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_sm90_kernel(const FwdParams p) {
  extern __shared__ unsigned char smem_raw[];
  // the swizzle atoms must be 1024-byte aligned in the shared address space
  unsigned char* smem = smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024);
  bf16* sQ = reinterpret_cast<bf16*>(smem);                  // [BM][D]
  bf16* sK = sQ + kBM * D;                                   // [2][BN][D]
  bf16* sV = sK + 2 * kBN * D;                               // [2][BN][D]
  float* sMask = reinterpret_cast<float*>(sV + 2 * kBN * D);  // [2][BN], times log2 e

  const int T = p.T, H = p.H, Hkv = p.Hkv;
  const int mt = gridDim.x - 1 - blockIdx.x;  // longest rows of the head first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (H / Hkv);
  const int q0 = mt * kBM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long qstride = static_cast<long>(H) * D, kstride = static_cast<long>(Hkv) * D;
  const bf16* qb = p.q + static_cast<long>(b) * T * qstride + static_cast<long>(h) * D;
  const bf16* kb = p.k + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;
  const bf16* vb = p.v + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;
  const float* mb = p.mask ? p.mask + static_cast<long>(b) * T * Hkv + hk : nullptr;
  const int ntiles = (min(T, q0 + kBM) + kBN - 1) / kBN;

  auto load_kv = [&](int n, int stage) {
    load_tile<kBN, D, kThreads>(sK + stage * kBN * D, kb, n * kBN, T, kstride);
    load_tile<kBN, D, kThreads>(sV + stage * kBN * D, vb, n * kBN, T, kstride);
    for (int i = tid; i < kBN; i += kThreads) {
      const int key = n * kBN + i;
      sMask[stage * kBN + i] = (mb && key < T) ? mb[static_cast<long>(key) * Hkv] * kLog2e : 0.f;
    }
  };

  load_tile<kBM, D, kThreads>(sQ, qb, q0, T, qstride);
  cp_async_commit();
  load_kv(0, 0);
  cp_async_commit();
  if (p.exclude_ctrl) {  // once the whole Q tile is in: zero its control channel
    cp_async_wait<1>();
    __syncthreads();
    if (tid < kBM) sQ[swizzled<kBM>(tid, D - 1)] = __float2bfloat16(0.f);
  }

  float o[D / 2], s[kBN / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int row = q0 + warp * 16 + lane / 4;  // the thread's rows: row, row + 8
  const uint32_t uQ = smem_u32(sQ);

  for (int n = 0; n < ntiles; ++n) {
    const int stage = n & 1;
    if (n + 1 < ntiles) load_kv(n + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();  // the tiles (and the zeroed channel) are read by the tensor cores
    __syncthreads();
    const int kbase = n * kBN;
    scores<D, kBN, kBM>(s, uQ, smem_u32(sK + stage * kBN * D));
    const bool edge = kbase + kBN - 1 + p.window >= q0 + warp * 16 || kbase + kBN > T;
    softmax_tile<D, kBN>(s, o, m, l, sMask + stage * kBN, kbase, row, edge, p);
    accumulate_pv<D, kBN>(o, s, smem_u32(sV + stage * kBN * D));
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  store_rows<D>(o, m, l, row, b, h, p);
}

template <int D>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const size_t smem = 1024 + sizeof(bf16) * (kBM * D + 4 * kBN * D) + sizeof(float) * 2 * kBN;
  auto kernel = attn_fwd_sm90_kernel<D>;
  static bool configured = false;
  if (!configured) {
    DMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    configured = true;
  }
  dim3 grid(ceil_div(p.T, kBM), p.H, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(p);
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
  FwdParams p{q, k, v, mask, out, lse, B, T, H, Hkv, scale * kLog2e, exclude_ctrl, mask_window};
  if (D == 64)
    launch_fwd<64>(p, stream);
  else
    launch_fwd<128>(p, stream);
}

}  // namespace dmc::cuda
