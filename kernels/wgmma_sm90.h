// Hopper (sm_90a) building blocks shared by the *_sm90.cu attention kernels: warpgroup MMA
// (wgmma) on 128-byte-swizzled shared-memory tiles, mbarriers, TMA tile loads, stores and
// reduce-adds, plain bulk copies, and the tensor maps that describe them. Included only by files
// built for sm_90a (kernels/CMakeLists.txt).
//
// Tile layout. A [rows][D] bf16 tile is stored as D/64 column blocks of [rows][64] (128 bytes a
// row); within every 8-row, 1024-byte atom the 16-byte chunk c of row r sits at chunk c ^ (r % 8)
// (swizzled() below). Tile bases are 1024-byte aligned. TMA writes this layout itself (a box of 64
// channels x rows, CU_TENSOR_MAP_SWIZZLE_128B), and a wgmma matrix descriptor walks it:
//   - K-major operand (the reduction dimension is the contiguous one: Q, K as operands of Q K^T):
//     a 16-element reduction step kk is 32 bytes along the row within column block kk / 4; the
//     stride offset is one 8-row atom (1024 bytes); the leading offset is unused with swizzling.
//   - MN-major operand (the rows are the reduction dimension: V as B of P V, or any tile read
//     transposed): a 16-row step kk is two atoms down (2048 bytes); the leading offset is the
//     next column block of 64 (M or N) elements, the stride offset the next 8 rows. The PTX ISA
//     gives A (imm-trans-a = 1, "M-major") and B (imm-trans-b = 1, "N-major") the same canonical
//     layout, ((8·8, m), (8, k)) : ((1, leading), (64, stride)) in elements.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes via the runtime)
#include <cudaTypedefs.h>

#include "kernels/cuda_check.h"
#include "kernels/persistent_schedule.h"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "kernels/wgmma_sm90.h uses sm_90a instructions (wgmma): build its users for sm_90a only"
#endif

namespace dmc::cuda::detail {

// ---------------------------------------------------------------- the swizzled tile
// Element offset of (row, col) in a swizzled [R][D] tile.
template <int R>
__device__ __forceinline__ int swizzled(int row, int col) {
  return (col / 64) * R * 64 + row * 64 + ((((col % 64) / 8) ^ (row & 7)) << 3) + col % 8;
}

// ---------------------------------------------------------------- matrix descriptors
// Descriptor of a 128-byte-swizzled shared-memory operand (PTX ISA, "matrix descriptor"): start
// address, leading and stride byte offsets in 16-byte units, swizzle mode 1 (128 bytes).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lead_bytes,
                                              uint32_t stride_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         static_cast<uint64_t>(lead_bytes >> 4) << 16 |
         static_cast<uint64_t>(stride_bytes >> 4) << 32 | 1ull << 62;
}
// K-major operand of R rows: the 16-element step kk is 32 bytes into the row of column block
// kk / 4; the stride offset is one 8-row atom, the leading offset unused with swizzling.
template <int R>
__device__ __forceinline__ uint64_t kmajor_desc(uint32_t tile, int kk) {
  return smem_desc(tile + (kk / 4) * R * 128 + (kk % 4) * 32, 16, 1024);
}
// MN-major operand of a tile of R rows (the rows are the reduction dimension): the 16-row step kk
// is two atoms down; the leading offset is the next column block of 64 elements, the stride
// offset the next 8 rows.
template <int R>
__device__ __forceinline__ uint64_t nmajor_desc(uint32_t tile, int kk) {
  return smem_desc(tile + kk * 2048, R * 128, 1024);
}

// ---------------------------------------------------------------- wgmma
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
// The same for A fragments in registers, which a wgmma reads until it is waited for.
template <int M>
__device__ __forceinline__ void pin(uint32_t (&r)[M][4]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
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

// d (64 x N, fp32) = (accumulate ? d : 0) + A B with A (64 x 16) and B (16 x N) in shared memory,
// K-major by default; kTransA / kTransB = 1 reads A / B MN-major (nmajor_desc). Accumulator layout
// (per warp w of the warpgroup, as mma.sync's m16n8): d[4j + e] is row 16w + lane/4 + 8(e/2),
// column 8j + 2(lane%4) + e%2.
template <int N, int kTransA = 0, int kTransB = 0>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b,
                                         bool accumulate);
template <>
__device__ __forceinline__ void wgmma_ss<64, 0, 0>(float (&d)[32], uint64_t a, uint64_t b,
                                                   bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " DMC_REGS32
      ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      : DMC_ACC32
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}
template <>
__device__ __forceinline__ void wgmma_ss<64, 1, 1>(float (&d)[32], uint64_t a, uint64_t b,
                                                   bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " DMC_REGS32
      ", %32, %33, p, 1, 1, 1, 1;\n}\n"
      : DMC_ACC32
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}
template <>
__device__ __forceinline__ void wgmma_ss<128, 0, 0>(float (&d)[64], uint64_t a, uint64_t b,
                                                    bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " DMC_REGS64
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : DMC_ACC64
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}
// d (64 x N) += A B, A (64 x 16 bf16) in registers in mma.sync's m16n8k16 A-fragment layout per
// warp (pack_a_fragments), B (16 x N) N-major in shared memory (the transposed read).
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

// The accumulator values of s (64 x N), rounded to bf16, as A fragments of the N/16 16-column
// steps of a following wgmma_rs_nmajor: the accumulator layout is the A-fragment layout, two
// columns per register.
template <int N>
__device__ __forceinline__ void pack_a_fragments(uint32_t (&pa)[N / 16][4],
                                                 const float (&s)[N / 2]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) pa[kk][r] = pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

// Makes this thread's ordinary shared-memory writes visible to the tensor cores (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void named_barrier(int id) {  // the N threads that name barrier id
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(N) : "memory");
}
// Counts the calling threads towards barrier id's N without waiting (the other side's bar.sync
// waits for them).
template <int N>
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(N) : "memory");
}

// ---------------------------------------------------------------- mbarriers and TMA
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
// Makes the mbarrier initialisations visible to the other threads and to the TMA unit.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrives and announces the bytes that copies will deliver in the current phase: the phase
// completes once they have landed.
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
// A [rows][D] tile (D/64 boxes) of rows t0.. of head h, sequence b, into the swizzled tile dst.
template <int ROWS, int D>
__device__ __forceinline__ void tma_load_tile(__nv_bfloat16* dst, const CUtensorMap* map, int h,
                                              int t0, int b, uint64_t* bar) {
#pragma unroll
  for (int c = 0; c < D / 64; ++c) tma_load(dst + c * ROWS * 64, map, c * 64, h, t0, b, bar);
}

// `bytes` contiguous bytes of global memory into shared memory by the bulk-copy engine (no tensor
// map: a plain row), completing on bar. Both addresses 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1], %2, [%3];\n" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

// One box of a 2-D tensor map ({x, y}, innermost first) into shared memory, completing on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(x), "r"(y), "r"(smem_u32(bar))
      : "memory");
}
// Global += one box of shared memory, at {c, h, t, b} of a 4-D fp32 tensor map, element by element
// in the L2 (cp.reduce.async.bulk.tensor: no thread waits on it; elements outside the tensor are
// skipped). Joins the calling thread's current bulk group (bulk_commit).
__device__ __forceinline__ void tma_reduce_add(const CUtensorMap* map, const void* src, int c,
                                               int h, int t, int b) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(map),
      "r"(c), "r"(h), "r"(t), "r"(b), "r"(smem_u32(src))
      : "memory");
}
// Global = one box of shared memory, at {c, h, t, b} of a 4-D tensor map (cp.async.bulk.tensor:
// the store's inverse of tma_load; elements outside the tensor are skipped). Joins the calling
// thread's current bulk group (bulk_commit). The writing threads' fence_proxy_async and a barrier
// must come first.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int c, int h,
                                          int t, int b) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group"
      " [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(map),
      "r"(c), "r"(h), "r"(t), "r"(b), "r"(smem_u32(src))
      : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until at most N of the calling thread's bulk groups still read their shared memory (the
// source may be rewritten after that).
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N of the calling thread's bulk groups are still incomplete (their writes to
// global memory included).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------- tensor maps (host)
// The driver's tensor-map encoder, reached through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    DMC_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
      std::fprintf(stderr, "dmc attention (sm90): the driver has no cuTensorMapEncodeTiled\n");
      std::abort();
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A tiled tensor map of `rank` dimensions (innermost first; strides in bytes of dimensions
// 1..rank-1), unit element strides, positions outside the tensor read as zeros. `what` names the
// tensor in the error, beside its dimensions.
inline CUtensorMap encode_tensor_map(CUtensorMapDataType type, int rank, const void* base,
                                     const cuuint64_t* dims, const cuuint64_t* strides,
                                     const cuuint32_t* box, CUtensorMapSwizzle swizzle,
                                     const char* what) {
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = tensor_map_encoder()(
      &map, type, rank, const_cast<void*>(base), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "dmc attention (sm90): cuTensorMapEncodeTiled failed (error %d) for %s {",
                 static_cast<int>(r), what);
    for (int i = 0; i < rank; ++i)
      std::fprintf(stderr, "%s%llu", i ? ", " : "", static_cast<unsigned long long>(dims[i]));
    std::fprintf(stderr, "} (innermost first; 16-byte aligned?)\n");
    std::abort();
  }
  return map;
}

// Tensor map of a [B, T, heads, D] bf16 tensor, dimensions innermost first {D, heads, T, B}; a box
// is 64 channels x 1 head x rows positions x 1 sequence, 128-byte swizzled: one column block of a
// tile. Positions past T (within the sequence) arrive as zeros; a store skips them.
inline CUtensorMap make_tile_map(const __nv_bfloat16* base, int B, int T, int heads, int D,
                                 int rows) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(T), static_cast<cuuint64_t>(B)};
  const cuuint64_t elem = sizeof(__nv_bfloat16);
  const cuuint64_t strides[3] = {elem * D, elem * D * heads, elem * D * heads * T};
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(rows), 1};
  return encode_tensor_map(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, base, dims, strides, box,
                           CU_TENSOR_MAP_SWIZZLE_128B, "a [B, T, heads, D] bf16 tensor");
}

// ---------------------------------------------------------------- persistent schedules
// The tile order and section size: kernels/persistent_schedule.h.
// The counter a persistent launch on `stream` claims its tiles past the first from (scratch slot
// `slot`), zeroed in stream order.
inline int* persistent_counter(int slot, cudaStream_t stream) {
  int* counter = static_cast<int*>(scratch(slot, sizeof(int)));
  DMC_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(int), stream));
  return counter;
}

// Lets Kernel take `bytes` of dynamic shared memory (past the 48 KiB default): set once per
// kernel, at its first launch.
template <auto Kernel>
void allow_dynamic_smem(size_t bytes) {
  static const bool configured = [bytes] {
    DMC_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
    return true;
  }();
  (void)configured;
}

}  // namespace dmc::cuda::detail
