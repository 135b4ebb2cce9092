// Paged decode attention on the GPU (spec: kernels/decode_attention.h): one new query token per
// sequence over a paged KV cache in which every (sequence, KV head) has its own length, GQA.
// A decode step reads each key/value row once for G query heads: with few heads per row the work
// is bound by the bytes of the cache, and CUDA cores keep up; with many, tensor cores do the math.
//
// CUDA-core kernel (groups of 1 to 3 query heads, or more than 16): grid (B·Hkv·(G/GT), splits).
//   A CTA (4 warps) owns GT query heads of one KV head (GT = the largest of 4, 2, 1 dividing G,
//   so those heads read each row once) and one chunk of `chunk` slots of that head; a CTA whose
//   chunk starts past the head's length exits at once. D/8 threads share a key row, 8 channels
//   (one 16-byte load) each, so a warp reads 32·16 contiguous bytes of a page per step (2 rows at
//   D = 128, 4 at D = 64, 8 at D = 32), and every thread issues the page-table lookups and the
//   16-byte K and V loads of 4 rows before using them.
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
// A head of one chunk, no probs asked for: its CTA writes bf16 out directly. Otherwise
//   (flash-decoding) each chunk's CTA writes its unnormalised output and (max, sum) to fp32
//   scratch, and the combine kernel (one warp per query head) merges the head's chunks in order
//   and normalises; with probs, the main kernel stores the base-2 scores and the combine kernel
//   turns them into weights.
// Every reduction has a fixed order, so results are deterministic.
// Both kernels, the chunking and the combine kernel live in decode_attention_cuda.h, shared with
// the quantized cache's attention (decode_attention_quantized.cu); this file gives them its bf16
// pool as the source of rows (CUDA cores) and of cp.async tiles (tensor cores).
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
  static constexpr bool kConsecutive = false;
  const bf16* k_pool;
  const bf16* v_pool;
  const int32_t* pages;  // the head's page table
  int page_size;
  struct Raw {
    uint4 k, v;
  };
  template <int U>
  __device__ __forceinline__ void fetch(Raw (&raw)[U], const int (&slot)[U],
                                        const bool (&valid)[U], int cl) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      raw[u] = Raw{};
      if (!valid[u]) continue;
      const long off =
          (static_cast<long>(pages[slot[u] / page_size]) * page_size + slot[u] % page_size) * D +
          cl * 8;
      raw[u] = Raw{*reinterpret_cast<const uint4*>(k_pool + off),
                   *reinterpret_cast<const uint4*>(v_pool + off)};
    }
  }
  __device__ __forceinline__ void key(const Raw& r, float (&f)[8]) const { unpack8(f, r.k); }
  __device__ __forceinline__ void value(const Raw& r, float (&f)[8]) const { unpack8(f, r.v); }
};

// The same pool in 16-slot tiles for the tensor-core kernel: each stage holds the K tile then
// the V tile, [16][D] bf16 swizzled, copied straight from the pool with cp.async (slots past the
// chunk zero-filled), and the kernel reads them where they landed.
template <int D>
struct PoolTiles {
  static constexpr int kStages = D <= 64 ? 4 : 3;  // 3 CTAs per SM at 64, 2 at 128
  static constexpr bool kAligned = false;
  static constexpr int kStageBytes = static_cast<int>(sizeof(bf16)) * 2 * kTileRows * D;
  static_assert(kStages * kStageBytes >= mma_epilogue_bytes(D), "epilogue fits");
  const bf16* k_pool;
  const bf16* v_pool;
  const int32_t* pages;  // the head's page table
  int page_size;
  __device__ __forceinline__ void load(unsigned char* warp_smem, int stage, int t0, int,
                                       int s1, int lane) const {
    constexpr int CPR = D / 8;     // 16-byte chunks per row
    constexpr int RPP = 32 / CPR;  // rows a warp copies per pass
    bf16* sK = reinterpret_cast<bf16*>(warp_smem + stage * kStageBytes);
    bf16* sV = sK + kTileRows * D;
    const int lc = lane % CPR, lr = lane / CPR;
#pragma unroll
    for (int j = 0; j < kTileRows / RPP; ++j) {
      const int r = lr + j * RPP, slot = t0 + r;
      const bool valid = slot < s1;
      long off = 0;
      if (valid)
        off = (static_cast<long>(pages[slot / page_size]) * page_size + slot % page_size) * D +
              lc * 8;
      cp_async16(sK + swz<D>(r, lc), k_pool + off, valid);
      cp_async16(sV + swz<D>(r, lc), v_pool + off, valid);
    }
  }
  __device__ __forceinline__ uint32_t ready(unsigned char* warp_smem, int stage, int, int, int,
                                            int) const {
    return smem_u32(warp_smem + stage * kStageBytes);
  }
};

struct Params : Common {
  static constexpr bool kHeadDim32 = true;
  const bf16* k_pool;
  const bf16* v_pool;
  const int32_t* page_table;
  const int* lengths;
  int max_pages, page_size;
  __device__ __forceinline__ int length(long head) const { return lengths[head]; }
  __device__ __forceinline__ const int32_t* pages(long head) const {
    return page_table + head * max_pages;
  }
  template <int D>
  __device__ __forceinline__ PoolRows<D> rows(long head) const {
    return PoolRows<D>{k_pool, v_pool, pages(head), page_size};
  }
  template <int D>
  __device__ __forceinline__ PoolTiles<D> tiles(long head) const {
    return PoolTiles<D>{k_pool, v_pool, pages(head), page_size};
  }
  template <int D>
  __device__ __forceinline__ int mma_warp_bytes() const {
    return PoolTiles<D>::kStages * PoolTiles<D>::kStageBytes;
  }
};

template <int D>
constexpr size_t pool_mma_smem() {
  return mma_smem_bytes(D, PoolTiles<D>::kStages * PoolTiles<D>::kStageBytes);
}

// The tensor-core kernel's shared memory exceeds the 48 KiB default; set once, before any
// graph capture (the engine's reserve call comes first).
void configure_mma_kernels() {
  static bool configured = false;
  if (configured) return;
  allow_mma_smem<32, Params>(pool_mma_smem<32>());
  allow_mma_smem<64, Params>(pool_mma_smem<64>());
  allow_mma_smem<128, Params>(pool_mma_smem<128>());
  configured = true;
}

}  // namespace

void paged_decode_attention_reserve(int B, int H, int D, int max_pages, int page_size,
                                    int split_slots) {
  configure_mma_kernels();
  configure_quantized_mma_kernels();
  configure_think_mma_kernels();
  const long max_len = static_cast<long>(max_pages) * page_size;
  const long splits = (max_len + split_slots - 1) / split_slots;
  scratch(kScratchDecodeSplits, sizeof(float) * static_cast<size_t>(B) * H * splits * (D + 2));
}

void paged_decode_attention(bf16* out, float* probs, int probs_stride, const bf16* q,
                            const bf16* k_pool, const bf16* v_pool, const int32_t* page_table,
                            const int* lengths, int max_pages, int page_size, int B, int H,
                            int Hkv, int D, bool exclude_ctrl, float scale, cudaStream_t stream,
                            int split_slots) {
  constexpr const char* kOp = "paged_decode_attention";
  if (B <= 0 || H <= 0) return;
  if (D != 32 && D != 64 && D != 128) fail(kOp, "head dim must be 32, 64 or 128");
  if (Hkv <= 0 || H % Hkv != 0) fail(kOp, "H must be a multiple of Hkv");
  if (page_size <= 0 || max_pages <= 0) fail(kOp, "page_size and max_pages must be positive");
  if (probs != nullptr && probs_stride <= 0) fail(kOp, "probs_stride must be positive");
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out) |
       reinterpret_cast<uintptr_t>(k_pool) | reinterpret_cast<uintptr_t>(v_pool)) & 15u)
    fail(kOp, "q, out, k_pool and v_pool must be 16-byte aligned");
  const int G = H / Hkv;
  configure_mma_kernels();
  Params p{};
  p.k_pool = k_pool;
  p.v_pool = v_pool;
  p.page_table = page_table;
  p.lengths = lengths;
  p.max_pages = max_pages;
  p.page_size = page_size;
  launch_decode(p, kOp, out, probs, probs_stride, q, B, H, Hkv, D, exclude_ctrl, scale,
                G >= 4 && G <= 16, static_cast<long>(max_pages) * page_size, split_slots,
                D == 32 ? pool_mma_smem<32>()
                        : D == 64 ? pool_mma_smem<64>() : pool_mma_smem<128>(),
                stream);
}

}  // namespace dmc::cuda
