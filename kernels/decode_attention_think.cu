// Paged decode attention over a ThinK cache on the GPU (spec: kernels/decode_attention.h,
// paged_decode_attention_think; the pages: kernels/think_channels.h). It runs the kernels of
// decode_attention_cuda.h over a head's slots in the CPU reference's order, its pruned pages,
// then its residual block: the tensor-core kernel for GQA groups of 4 to 16 when a page holds
// whole 16-slot tiles, the CUDA-core kernel otherwise; chunks (flash-decoding), the combine
// kernel and the fixed reduction order (deterministic) are theirs.
//
// A pruned key is expanded as it is read: the 8 channels [8·cl, 8·cl + 8) a thread owns are
// exactly bit byte cl of the page's mask, and the kept ones among them sit in the pruned row
// consecutively from the count of kept channels below 8·cl (the popcounts of mask bytes below
// cl); the others read 0, so q·k sums the kept channels only, the CPU reference's masked query.
// Values are whole bf16 rows, read as from the bf16 pool.
// Tensor-core path (page_size a multiple of 16): tiles start at multiples of 16 of the head's
//   slots (the pruned slots are whole pages), so a tile lies in one page or in the residual
//   block. A warp's ring stage is a K and a V tile [16][D] bf16 swizzled, as the bf16 pool's:
//   load() copies the V rows (and a residual tile's K rows) with cp.async, slots outside the
//   chunk zero-filled; a page's pruned keys (rows of `kept` elements, not 16-byte aligned) are
//   expanded into the K tile by ready(), when the tile is due.
// CUDA-core path: D/8 threads share a row, as over a bf16 pool, and a row group takes kUnroll
//   consecutive slots per step, so a page's mask byte and offset are found once for them.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "kernels/decode_attention_cuda.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using namespace decode;

// One head's pruned pages: slot i < pruned is row i % page_size of page table[i / page_size].
struct ThinkPages {
  const uint16_t* k_pages;  // bf16 bits [pages, page_size, kept]
  const bf16* v_pages;      // [pages, page_size, D]
  const uint8_t* masks;     // [pages, mask_bytes]
  const int32_t* table;
  int page_size, kept, mask_bytes;

  // Mask byte cl of `page` and the place of channel 8·cl's first kept channel in a pruned row.
  __device__ __forceinline__ void channels(long page, int cl, uint32_t* byte, int* first) const {
    const uint8_t* mask = masks + page * mask_bytes;
    int below = 0;
    for (int b = 0; b < cl; ++b) below += __popc(mask[b]);
    *byte = mask[cl];
    *first = below;
  }
  // Channels [8·cl, 8·cl + 8) of pruned row `row` (page · page_size + row in page), zeros at the
  // pruned ones, as 8 packed bf16.
  __device__ __forceinline__ uint4 key(long row, uint32_t byte, int first) const {
    const uint16_t* k = k_pages + row * kept + first;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    int n = 0;
#pragma unroll
    for (int c = 0; c < 8; ++c)
      if ((byte >> c) & 1u) w[c / 2] |= static_cast<uint32_t>(k[n++]) << (16 * (c % 2));
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <int D>
struct ThinkRows {
  static constexpr bool kConsecutive = true;
  ThinkPages pages;
  int pruned;
  const bf16* r_k;  // the head's residual block
  const bf16* r_v;
  struct Raw {
    uint4 k, v;
  };
  template <int U>
  __device__ __forceinline__ void fetch(Raw (&raw)[U], const int (&slot)[U],
                                        const bool (&valid)[U], int cl) const {
    int mask_of = -1;  // the page-table index whose mask byte and offset are in byte, first
    uint32_t byte = 0;
    int first = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      raw[u] = Raw{};
      if (!valid[u]) continue;
      if (slot[u] >= pruned) {
        const long off = static_cast<long>(slot[u] - pruned) * D + cl * 8;
        raw[u] = Raw{*reinterpret_cast<const uint4*>(r_k + off),
                     *reinterpret_cast<const uint4*>(r_v + off)};
        continue;
      }
      const int index = slot[u] / pages.page_size;
      const long page = pages.table[index];
      if (index != mask_of) {
        mask_of = index;
        pages.channels(page, cl, &byte, &first);
      }
      const long row = page * pages.page_size + slot[u] - index * pages.page_size;
      raw[u] = Raw{pages.key(row, byte, first),
                   *reinterpret_cast<const uint4*>(pages.v_pages + row * D + cl * 8)};
    }
  }
  __device__ __forceinline__ void key(const Raw& r, float (&f)[8]) const { unpack8(f, r.k); }
  __device__ __forceinline__ void value(const Raw& r, float (&f)[8]) const { unpack8(f, r.v); }
};

template <int D>
struct ThinkTiles {
  static constexpr int kStages = D == 64 ? 4 : 3;
  static constexpr bool kAligned = true;  // a tile lies in one page or in the residual block
  static constexpr int kStageBytes = static_cast<int>(sizeof(bf16)) * 2 * kTileRows * D;
  static_assert(kStages * kStageBytes >= mma_epilogue_bytes(D), "epilogue fits");
  static constexpr int CPR = D / 8;     // 16-byte chunks per row
  static constexpr int RPP = 32 / CPR;  // rows a warp covers per pass
  ThinkPages pages;
  int pruned;
  const bf16* r_k;
  const bf16* r_v;

  __device__ __forceinline__ void load(unsigned char* warp_smem, int stage, int t0, int s0,
                                       int s1, int lane) const {
    bf16* sK = reinterpret_cast<bf16*>(warp_smem + stage * kStageBytes);
    bf16* sV = sK + kTileRows * D;
    const int lc = lane % CPR, lr = lane / CPR;
    const bool residual = t0 >= pruned;
#pragma unroll
    for (int j = 0; j < kTileRows / RPP; ++j) {
      const int r = lr + j * RPP, slot = t0 + r;
      const bool valid = slot >= s0 && slot < s1;
      const bf16 *k = r_k, *v = r_v;
      if (valid && residual) {
        k = r_k + static_cast<long>(slot - pruned) * D + lc * 8;
        v = r_v + static_cast<long>(slot - pruned) * D + lc * 8;
      } else if (valid) {
        const int index = slot / pages.page_size;
        v = pages.v_pages +
            (static_cast<long>(pages.table[index]) * pages.page_size + slot -
             index * pages.page_size) * D + lc * 8;
      }
      if (residual) cp_async16(sK + swz<D>(r, lc), k, valid);
      cp_async16(sV + swz<D>(r, lc), v, valid);
    }
  }
  __device__ __forceinline__ uint32_t ready(unsigned char* warp_smem, int stage, int t0, int s0,
                                            int s1, int lane) const {
    bf16* sK = reinterpret_cast<bf16*>(warp_smem + stage * kStageBytes);
    if (t0 < pruned) {  // expand the page's pruned keys into the K tile
      const int lc = lane % CPR, lr = lane / CPR;
      const int index = t0 / pages.page_size;
      const long page = pages.table[index];
      uint32_t byte;
      int first;
      pages.channels(page, lc, &byte, &first);
      const long row0 = page * pages.page_size + t0 - index * pages.page_size;
#pragma unroll
      for (int j = 0; j < kTileRows / RPP; ++j) {
        const int r = lr + j * RPP, slot = t0 + r;
        const uint4 k = slot >= s0 && slot < s1 ? pages.key(row0 + r, byte, first)
                                                : make_uint4(0u, 0u, 0u, 0u);
        *reinterpret_cast<uint4*>(sK + swz<D>(r, lc)) = k;
      }
      __syncwarp();  // the whole tile is written before any lane's ldmatrix reads it
    }
    return smem_u32(sK);
  }
};

struct Params : Common {
  const uint16_t* k_pages;
  const bf16* v_pages;
  const uint8_t* masks;
  int kept, mask_bytes;
  const int32_t* page_table;
  const int* p_lengths;
  int max_pages, page_size;
  const bf16* r_k_pool;
  const bf16* r_v_pool;
  const int32_t* residual_block;
  const int* r_lengths;
  int residual_slots;
  __device__ __forceinline__ int length(long head) const {
    return p_lengths[head] + r_lengths[head];
  }
  __device__ __forceinline__ ThinkPages pages(long head) const {
    return ThinkPages{k_pages, v_pages,   masks, page_table + head * max_pages,
                      page_size, kept, mask_bytes};
  }
  template <int D>
  __device__ __forceinline__ ThinkRows<D> rows(long head) const {
    const long block = static_cast<long>(residual_block[head]) * residual_slots * D;
    return ThinkRows<D>{pages(head), p_lengths[head], r_k_pool + block, r_v_pool + block};
  }
  template <int D>
  __device__ __forceinline__ ThinkTiles<D> tiles(long head) const {
    const long block = static_cast<long>(residual_block[head]) * residual_slots * D;
    return ThinkTiles<D>{pages(head), p_lengths[head], r_k_pool + block, r_v_pool + block};
  }
  template <int D>
  __device__ __forceinline__ int mma_warp_bytes() const {
    return ThinkTiles<D>::kStages * ThinkTiles<D>::kStageBytes;
  }
};

template <int D>
constexpr size_t think_mma_smem() {
  return mma_smem_bytes(D, ThinkTiles<D>::kStages * ThinkTiles<D>::kStageBytes);
}

}  // namespace

void decode::configure_think_mma_kernels() {
  static bool configured = false;
  if (configured) return;
  allow_mma_smem<64, Params>(think_mma_smem<64>());
  allow_mma_smem<128, Params>(think_mma_smem<128>());
  configured = true;
}

void paged_decode_attention_think(bf16* out, float* probs, int probs_stride, const bf16* q,
                                  const bf16* k_pages, const bf16* v_pages, const uint8_t* masks,
                                  int kept, const int32_t* page_table, const int* p_lengths,
                                  int max_pages, int page_size, const bf16* r_k_pool,
                                  const bf16* r_v_pool, const int32_t* residual_block,
                                  const int* r_lengths, int residual_slots, int B, int H, int Hkv,
                                  int D, bool exclude_ctrl, float scale, cudaStream_t stream,
                                  int split_slots) {
  constexpr const char* kOp = "paged_decode_attention_think";
  if (B <= 0 || H <= 0) return;
  if (D != 64 && D != 128) fail(kOp, "head dim must be 64 or 128");
  if (kept < 1 || kept > D) fail(kOp, "kept channels must be 1 to D");
  if (Hkv <= 0 || H % Hkv != 0) fail(kOp, "H must be a multiple of Hkv");
  if (page_size <= 0 || max_pages <= 0 || residual_slots < 0)
    fail(kOp, "page_size and max_pages must be positive, residual_slots not negative");
  if (probs != nullptr && probs_stride <= 0) fail(kOp, "probs_stride must be positive");
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out) |
       reinterpret_cast<uintptr_t>(v_pages) | reinterpret_cast<uintptr_t>(r_k_pool) |
       reinterpret_cast<uintptr_t>(r_v_pool)) & 15u)
    fail(kOp, "q, out, v_pages, r_k_pool and r_v_pool must be 16-byte aligned");
  const int G = H / Hkv;
  decode::configure_think_mma_kernels();
  Params p{};
  p.k_pages = reinterpret_cast<const uint16_t*>(k_pages);
  p.v_pages = v_pages;
  p.masks = masks;
  p.kept = kept;
  p.mask_bytes = kernels::ThinkMaskBytes(D);
  p.page_table = page_table;
  p.p_lengths = p_lengths;
  p.max_pages = max_pages;
  p.page_size = page_size;
  p.r_k_pool = r_k_pool;
  p.r_v_pool = r_v_pool;
  p.residual_block = residual_block;
  p.r_lengths = r_lengths;
  p.residual_slots = residual_slots;
  launch_decode(p, kOp, out, probs, probs_stride, q, B, H, Hkv, D, exclude_ctrl, scale,
                G >= 4 && G <= 16 && page_size % kTileRows == 0,
                static_cast<long>(max_pages) * page_size + residual_slots, split_slots,
                D == 64 ? think_mma_smem<64>() : think_mma_smem<128>(), stream);
}

}  // namespace dmc::cuda
