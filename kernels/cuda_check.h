// CUDA-only helpers shared by the kernels/*.cu files and the GPU tests: error checking, a grow-only
// scratch allocator, block reductions, bf16 <-> fp32 vector helpers, the PTX wrappers the
// attention kernels share. Never included by CPU code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>

#define DMC_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    cudaError_t dmc_err_ = (expr);                                                          \
    if (dmc_err_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(dmc_err_),      \
                   __FILE__, __LINE__, cudaGetErrorString(dmc_err_));                       \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)

// After every launch: catches bad configurations at once (asynchronous faults surface at the next
// synchronising call, which is checked as well).
#define DMC_CUDA_CHECK_LAUNCH() DMC_CUDA_CHECK(cudaGetLastError())

namespace dmc::cuda::detail {

inline int ceil_div(long a, long b) { return static_cast<int>((a + b - 1) / b); }

// Elements between a matrix's rows: the stride an op was given, or its packed width where the
// stride is 0 (the decode step's Q, K and V as one GEMM's row blocks, or three packed matrices).
inline long row_stride_or(long stride, long packed_width) {
  return stride > 0 ? stride : packed_width;
}

// The softmax kernels work in base 2 (one MUFU ex2 per exponential) and convert at the edges.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Grow-only device scratch, one per slot. The first call with a larger size allocates (and so
// synchronises); later calls of the same size reuse the buffer, so a warmed-up step can be
// captured into a CUDA graph. Not thread-safe: one host thread drives one device.
void* scratch(int slot, size_t bytes);
// The slots, one per user: two users of one slot would share its buffer (and resize it, which
// synchronises and so breaks a capture).
enum ScratchSlot : int {
  kScratchEmbeddingSort,          // embedding backward: the sorted tokens and their runs
  kScratchRmsnormPartials,        // RMSNorm backward: the weight's per-chunk partial sums
  kScratchDmcScanGates,           // DMC scan backward: the window coefficients' gradient
  kScratchAttentionDq,            // DMC attention backward: the fp32 dq accumulator
  kScratchAttentionStats,         // DMC attention backward: Delta and lse · log2 e
  kScratchAttentionBiasRows,      // Hopper DMC attention forward: the transposed bias rows
  kScratchAttentionTileCounter,   // Hopper DMC attention forward: the persistent tile counter
  kScratchAttentionBwdTileCounter,  // Hopper DMC attention backward: the persistent tile counter
  kScratchDecodeSplits,           // paged decode attention: the split partials
  kScratchLomaDelta,              // LoMA attention backward: Delta
  kScratchPagedKvSlots,           // paged KV writes: a run's slot (and ring count) per token
  kScratchDmsMerge,               // DMS prefill: the merge' rows
  kScratchCrossEntropyStats,      // whole-vocabulary cross-entropy: the row statistics
  kScratchCrLossPartials,         // CR loss: the per-chunk partial sums
  kScratchLtWorkspace,            // cuBLASLt: the GEMM workspace
};

int num_sms();

// ---- Programmatic dependent launch (Hopper) ----
// A decode step is a chain of short kernels, each waiting for the one before it. Launched with
// cudaLaunchAttributeProgrammaticStreamSerialization, a kernel's CTAs may start once every CTA
// of the kernel before it in the stream has started and called griddepcontrol.launch_dependents
// (or exited): they are resident when that kernel ends, instead of being launched after it. A
// kernel launched so must neither load what the kernel before it may write nor store anything
// before griddepcontrol.wait, which returns once that kernel has completed and its writes are
// visible; so every kernel launched through launch_dependent begins with producer_done() (wait,
// then let its own dependents start), at most after L2 prefetches of its weights (prefetch_l2,
// which loads no register). Both instructions are no-ops in a kernel launched without the
// attribute. DMC_PDL=0 launches without it (the comparison). launch_dependent checks the
// launch's result itself: its callers add no DMC_CUDA_CHECK_LAUNCH.
bool programmatic_launch();

#if defined(__CUDACC__)
__device__ __forceinline__ void producer_done() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Brings the 128-byte line of p into L2 (no register is written, nothing waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = programmatic_launch() ? 1 : 0;
  DMC_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}
#endif

// Whether every pointer may take 16-byte vector accesses (nullptr, an absent operand, may).
template <typename... Ptr>
bool aligned16(const Ptr*... p) {
  return (((reinterpret_cast<uintptr_t>(p) & 15u) == 0) && ...);
}

#if defined(__CUDACC__)
__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }
// log(sigmoid(x)) without overflow for large |x|.
__device__ __forceinline__ float logsigmoidf_(float x) {
  return fminf(x, 0.f) - log1pf(expf(-fabsf(x)));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  __shared__ Acc partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < nwarps ? partial[lane] : Acc(0);
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < nwarps ? partial[lane] : -INFINITY;
  return warp_max(v);
}
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ float ex2(float x) {  // 2^x, one MUFU instruction; ex2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float bf(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 tobf(float x) { return __float2bfloat16_rn(x); }

// One key tile of an online softmax (base 2) over mma.sync m16n8 accumulators: a lane holds rows
// lane/4 and lane/4 + 8 (hh = 0, 1), columns spread over its quad. The rows' maxima m and sums l
// advance, the output o [D/8 n-blocks] is rescaled, and s [KeyBlocks n-blocks of 8 keys] becomes
// the tile's unnormalized weights. A row with nothing visible yet (max −inf) keeps weight 0.
template <int KeyBlocks, int D>
__device__ __forceinline__ void online_softmax_tile(float (&s)[KeyBlocks][4], float (&o)[D / 8][4],
                                                    float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < KeyBlocks; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * hh], s[nb][2 * hh + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[hh], mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float corr = ex2(m[hh] - m_use);
    m[hh] = m_new;
    l[hh] *= corr;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      o[nb][2 * hh] *= corr;
      o[nb][2 * hh + 1] *= corr;
    }
#pragma unroll
    for (int nb = 0; nb < KeyBlocks; ++nb) {
      s[nb][2 * hh] = ex2(s[nb][2 * hh] - m_use);
      s[nb][2 * hh + 1] = ex2(s[nb][2 * hh + 1] - m_use);
      l[hh] += s[nb][2 * hh] + s[nb][2 * hh + 1];
    }
  }
}

// ldmatrix and mma.sync (m16n8k16, bf16 in, fp32 accumulate) on XOR-swizzled shared tiles: the
// Ampere-style tensor-core path of the attention kernels (training forward/backward, GQA decode).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// c += a (16x16, row) * b (16x8, col); bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Element offset of (row, 16-byte chunk) in a [rows][COLS] bf16 tile whose chunks are XOR-swizzled
// by row, so that the 8 rows an ldmatrix reads fall into 8 different bank groups. A row of at
// least 128 bytes (COLS >= 64) XORs its chunk with row & 7; a row of 64 bytes (COLS = 32, 4
// chunks, two rows to a 128-byte bank line) with (row >> 1) & 3, so that rows 2i and 2i + 1 fill
// the two halves of a line and the four lines differ in their XOR. Either key depends on row & 7
// only.
template <int COLS>
__device__ __forceinline__ int swz_key(int row) {
  static_assert(COLS == 32 || COLS % 64 == 0, "swizzle needs 4 or a multiple of 8 chunks per row");
  return COLS == 32 ? (row >> 1) & 3 : row & 7;
}
template <int COLS>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * COLS + ((chunk ^ swz_key<COLS>(row)) << 3);
}

// Fragment addresses without per-load index arithmetic. An ldmatrix.x4 reads a 16-row x 2-chunk
// block at rows row0 + [0, 16) (row0 a multiple of 8, so row & 7 == lane % 8) and chunks 2J, 2J+1.
// Lane l supplies one row address; two lane patterns cover every operand used here:
//   pattern A (A operands, and B operands read with .trans): row l%8 + 8·((l/8)%2), chunk +l/16
//   pattern B (B operands, and A operands read with .trans): row l%8 + 8·(l/16),    chunk +(l/8)%2
// With chunk = 2J + c (c in {0,1}) and key = swz_key(l%8) the swizzled byte offset in the row is
// ((2J + c) ^ key) << 4 = (J << 5) ^ ((c ^ key) << 4) (XOR is bitwise, 2J + c = 2J ^ c), so a
// lane's address is base + row0·rowbytes + (lane_off ^ (J << 5)): one XOR and one add.
template <int COLS>
__device__ __forceinline__ uint32_t lane_off_a(int lane) {
  return ((lane % 8) + ((lane / 8) % 2) * 8) * (COLS * 2) +
         (((lane / 16) ^ swz_key<COLS>(lane % 8)) << 4);
}
template <int COLS>
__device__ __forceinline__ uint32_t lane_off_b(int lane) {
  return ((lane % 8) + (lane / 16) * 8) * (COLS * 2) +
         ((((lane / 8) % 2) ^ swz_key<COLS>(lane % 8)) << 4);
}
template <int COLS>
__device__ __forceinline__ uint32_t frag(uint32_t base, uint32_t lane_off, int row0, int J) {
  return base + row0 * (COLS * 2) + (lane_off ^ (static_cast<uint32_t>(J) << 5));
}

// RoPE's angle of channel pair (ch, ch + D/2) at position pos (kernels/rope.h): one expression
// for the training RoPE and the decode cache's writes, so that both rotate a key alike.
__device__ __forceinline__ float rope_angle(int pos, int ch, int D, float theta) {
  return static_cast<float>(pos) * powf(theta, -2.0f * ch / D);
}

// 8 bf16 = 16 bytes, the unit of vectorised loads and stores, moved as one uint4: a copy of a
// struct of bf16 pairs compiles to four 4-byte accesses (ld.global.v2.u16), which quadruples the
// memory instructions and the L1 wavefronts of a streaming kernel. The address must be 16-byte
// aligned: callers check their rows on the host (aligned16) and take a scalar path otherwise.

// The 8 bf16 of a 16-byte word as floats (a bf16 is the top half of its float).
__device__ __forceinline__ void unpack8(float (&f)[8], uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]), pack_bf16(f[4], f[5]),
                    pack_bf16(f[6], f[7]));
}
__device__ __forceinline__ void load8(float (&f)[8], const __nv_bfloat16* p) {
  unpack8(f, *reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&f)[8]) {
  *reinterpret_cast<uint4*>(p) = pack8(f);
}
// 16 bytes from shared memory (addr from smem_u32) in one instruction: dmc_scan's loops got
// 4-byte pieces from a float4 read through a generic pointer.
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
#endif

}  // namespace dmc::cuda::detail
