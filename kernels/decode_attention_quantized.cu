// Paged decode attention over a quantized KV cache on the GPU (spec: kernels/decode_attention.h,
// paged_decode_attention_quantized; the page layout: kernels/kv_quant.h). It runs the kernels of
// decode_attention_cuda.h over a head's slots in the CPU reference's order, its full quantized
// pages (the last one partly filled when keys are per token: kernels/kv_quant.h), then its
// residual block: the tensor-core kernel for GQA groups of 4 to 16 when a page holds whole 16-slot
// tiles, the CUDA-core kernel otherwise; chunks (flash-decoding), the combine kernel and the fixed
// reduction order (deterministic) are theirs. A key's scale and zero point are those of its tier
// and channel (keys per channel) or of its row and channel group (keys per token); both come from
// the layout's KvKeyParamRow, so one code path reads either.
// Dequantization is the CPU reference's x = zero + code·scale in fp32, a multiply then an add
// (no fused multiply-add), so both paths see the CPU's values before their own rounding.
//
// Tensor-core path (page_size a multiple of 16): tiles start at multiples of 16 of the head's
//   slots, so a tile lies in one page, or in the residual block, whatever the chunk, except the
//   tile where a partly filled last page ends: its rows past the page's quantized ones are the
//   residual's first. The tile's slots outside the chunk are masked. A warp's ring stage holds
//   the raw bytes of one tile (of its page's rows, filled or not), copied with cp.async in
//   16-byte pieces (the tile's rows are contiguous in each region of the page, every region
//   16-byte aligned):
//     key codes of the 16 rows | value codes | key scales and zeros: the page's (every tier) per
//     channel, the 16 rows' scales then their zeros per token | the 16 rows' value scales |
//     their value zeros
//   so the parameters are loaded once per tile, not per row. When a tile is due, each lane
//   dequantizes 8 channels of 16/RPP rows (a key tier's 8 scales and zeros read once per tier;
//   keys per token, a row's once per row) and writes them, rounded to bf16, into the warp's bf16
//   K and V tile [16][D] in the swizzled layout the bf16 pool's tiles have; the mma products read
//   them there. The values thus enter the products in bf16, as the bf16 pool's do. Residual rows
//   are read straight into that tile with 16-byte loads when due, not through the ring.
// CUDA-core path: D/8 threads share a row, 8 channels each, as over a bf16 pool, and a row group
//   takes kUnroll consecutive slots per step, so a page's key scales and zeros for its channels
//   are loaded once for them (again when the page or the key tier changes; keys per token, for
//   every row); per row: its 8 key and 8 value codes (8·bits bits each, at most two 4-byte
//   loads: a page is only 4-byte aligned here) and the value scale and zero of its groups.
//   Residual rows: one 16-byte load each of key and value. The values stay fp32.
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
using kernels::KvQuantPageLayout;

// x[c] = zero[c] + code_c · scale[c] for the 8 codes of BITS bits packed little end first in
// (lo, hi), rounded as kernels::kv_dequantize_row rounds: a multiply, then an add. A code becomes
// a float through the mantissa of 2^23 (exact; an integer conversion is quarter rate).
template <int BITS>
__device__ __forceinline__ void dequantize8(float (&x)[8], uint32_t lo, uint32_t hi,
                                            const float (&scale)[8], const float (&zero)[8]) {
  constexpr uint32_t kMask = (1u << BITS) - 1;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int bit = c * BITS;
    const uint32_t code = ((bit < 32 ? lo : hi) >> (bit & 31)) & kMask;
    const float f = __uint_as_float(0x4B000000u | code) - 8388608.f;
    x[c] = __fadd_rn(zero[c], __fmul_rn(f, scale[c]));
  }
}

// The same from the 8 codes that start at byte p (4-byte loads: p is 2·bits-byte aligned).
__device__ __forceinline__ void dequantize8(float (&x)[8], int bits, const uint8_t* p,
                                            const float (&scale)[8], const float (&zero)[8]) {
  if (bits == 8) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p);
    dequantize8<8>(x, w[0], w[1], scale, zero);
  } else if (bits == 4) {
    dequantize8<4>(x, *reinterpret_cast<const uint32_t*>(p), 0u, scale, zero);
  } else {
    dequantize8<2>(x, *reinterpret_cast<const uint16_t*>(p), 0u, scale, zero);
  }
}

// The scales and zero points of channels [8·cl, 8·cl + 8) of one row, whose groups of 2^shift
// channels have theirs at scale_row[g], zero_row[g] (keys per channel: groups of one channel).
__device__ __forceinline__ void group_params(float (&scale)[8], float (&zero)[8],
                                             const float* scale_row, const float* zero_row, int cl,
                                             int shift) {
  if (shift >= 3) {  // one group holds all 8 channels
    const float s = scale_row[(cl * 8) >> shift], z = zero_row[(cl * 8) >> shift];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      scale[c] = s;
      zero[c] = z;
    }
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      scale[c] = scale_row[(cl * 8 + c) >> shift];
      zero[c] = zero_row[(cl * 8 + c) >> shift];
    }
  }
}

// One head for the CUDA-core kernel: slot i < quantized is row i % P of page table[i / P];
// slot quantized + j is row j of the head's residual block.
template <int D>
struct QuantRows {
  static constexpr bool kConsecutive = true;
  const uint8_t* pages;
  KvQuantPageLayout layout;
  const int32_t* table;
  int quantized;
  const bf16* r_k;  // the head's residual block
  const bf16* r_v;
  int key_group_shift, value_group_shift;  // key_group = 1 << key_group_shift; values alike
  struct Raw {
    float k[8], v[8];
  };
  template <int U>
  __device__ __forceinline__ void fetch(Raw (&raw)[U], const int (&slot)[U],
                                        const bool (&valid)[U], int cl) const {
    const KvQuantPageLayout& l = layout;
    int params_of = -1;  // (page-table index)·KvKeyParamRows + KvKeyParamRow of ks, kz
    float ks[8], kz[8];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      raw[u] = Raw{};
      if (!valid[u]) continue;
      if (slot[u] >= quantized) {
        const long off = static_cast<long>(slot[u] - quantized) * D + cl * 8;
        unpack8(raw[u].k, *reinterpret_cast<const uint4*>(r_k + off));
        unpack8(raw[u].v, *reinterpret_cast<const uint4*>(r_v + off));
        continue;
      }
      const int index = slot[u] / l.page_size, row = slot[u] - index * l.page_size;
      const uint8_t* page = pages + static_cast<long>(table[index]) * l.bytes;
      const int key_rows = kernels::KvKeyParamRows(l), key_row = kernels::KvKeyParamRow(l, row);
      if (index * key_rows + key_row != params_of) {
        params_of = index * key_rows + key_row;
        const float* key_scale =
            reinterpret_cast<const float*>(page + l.key_params) + key_row * l.key_groups;
        group_params(ks, kz, key_scale, key_scale + key_rows * l.key_groups, cl, key_group_shift);
      }
      const int bits = kernels::KvRowBits(l, row);
      const long codes = kernels::KvRowOffset(l, row) + cl * bits;  // channel 8·cl's byte
      const float* value_scale =
          reinterpret_cast<const float*>(page + l.value_params) + row * l.value_groups;
      float vs[8], vz[8];
      group_params(vs, vz, value_scale, value_scale + l.page_size * l.value_groups, cl,
                   value_group_shift);
      dequantize8(raw[u].k, bits, page + l.key_codes + codes, ks, kz);
      dequantize8(raw[u].v, bits, page + l.value_codes + codes, vs, vz);
    }
  }
  __device__ __forceinline__ void key(const Raw& r, float (&f)[8]) const {
#pragma unroll
    for (int c = 0; c < 8; ++c) f[c] = r.k[c];
  }
  __device__ __forceinline__ void value(const Raw& r, float (&f)[8]) const {
#pragma unroll
    for (int c = 0; c < 8; ++c) f[c] = r.v[c];
  }
};

// Geometry of a ring stage of the tensor-core path: the raw bytes of one 16-slot tile.
struct TileStage {
  int code_bytes;   // of one side (keys or values), for the widest rows
  int key_rows;     // rows of key scales (and of zeros): the page's tiers, or the tile's rows
  int key_params;   // bytes of those key scales and zeros
  int value_params; // bytes of the 16 rows' value scales (the zeros as many again)
  int bytes;        // the whole stage
};
inline TileStage tile_stage(const KvQuantPageLayout& l) {
  TileStage t;
  const int widest = std::max(l.bits, l.salient_slots > 0 ? l.salient_bits : 0);
  t.code_bytes = kTileRows * static_cast<int>(kernels::KvCodeRowBytes(l.head_dim, widest));
  t.key_rows = l.token_keys ? kTileRows : l.key_tiers;
  t.key_params = 2 * t.key_rows * l.key_groups * static_cast<int>(sizeof(float));
  t.value_params = kTileRows * l.value_groups * static_cast<int>(sizeof(float));
  t.bytes = 2 * t.code_bytes + t.key_params + 2 * t.value_params;
  return t;
}

// Copies n bytes (a multiple of 16, both ends 16-byte aligned) with the warp's cp.async.
__device__ __forceinline__ void copy_async(unsigned char* dst, const uint8_t* src, int n,
                                           int lane) {
  for (int o = lane * 16; o < n; o += 32 * 16) cp_async16(dst + o, src + o, true);
}

// Copies the scales of rows [r0, r0 + 16) of a page's table of per-row parameters (float
// scale[P][groups], then zero[P][groups], at `params`), then their zeros, to dst.
__device__ __forceinline__ void copy_row_params(unsigned char* dst, const uint8_t* params, int r0,
                                                int groups, int page_size, int lane) {
  const int row_bytes = groups * static_cast<int>(sizeof(float));
  const long zeros = static_cast<long>(page_size) * row_bytes;
  copy_async(dst, params + static_cast<long>(r0) * row_bytes, kTileRows * row_bytes, lane);
  copy_async(dst + kTileRows * row_bytes, params + zeros + static_cast<long>(r0) * row_bytes,
             kTileRows * row_bytes, lane);
}

// One head for the tensor-core kernel (the slots as in QuantRows). A warp's shared region: its
// bf16 K and V tile [16][D] each, then kStages stages of TileStage bytes.
template <int D>
struct QuantTiles {
  static constexpr int kStages = D == 64 ? 4 : 3;
  static constexpr bool kAligned = true;  // tiles start at multiples of 16 of the head's slots
  static constexpr int kTileBytes = static_cast<int>(sizeof(bf16)) * 2 * kTileRows * D;
  const uint8_t* pages;
  KvQuantPageLayout layout;
  const int32_t* table;
  int quantized;
  const bf16* r_k;  // the head's residual block
  const bf16* r_v;
  int key_group_shift, value_group_shift;
  TileStage stage_geometry;

  __device__ __forceinline__ unsigned char* stage_at(unsigned char* warp_smem, int stage) const {
    return warp_smem + kTileBytes + stage * stage_geometry.bytes;
  }
  // The quantized tile [t0, t0 + 16) = rows [r0, r0 + 16) of one page, raw, into the stage;
  // residual tiles wait for ready(), and so do the residual rows of a tile that starts in a
  // partly filled page.
  __device__ __forceinline__ void load(unsigned char* warp_smem, int stage, int t0, int, int,
                                       int lane) const {
    if (t0 >= quantized) return;
    const KvQuantPageLayout& l = layout;
    const TileStage& g = stage_geometry;
    unsigned char* st = stage_at(warp_smem, stage);
    const int index = t0 / l.page_size, r0 = t0 - index * l.page_size;
    const uint8_t* page = pages + static_cast<long>(table[index]) * l.bytes;
    const long c0 = kernels::KvRowOffset(l, r0);
    const int codes = static_cast<int>(kernels::KvRowOffset(l, r0 + kTileRows) - c0);
    copy_async(st, page + l.key_codes + c0, codes, lane);
    copy_async(st + g.code_bytes, page + l.value_codes + c0, codes, lane);
    if (l.token_keys)
      copy_row_params(st + 2 * g.code_bytes, page + l.key_params, r0, l.key_groups, l.page_size,
                      lane);
    else
      copy_async(st + 2 * g.code_bytes, page + l.key_params, g.key_params, lane);
    copy_row_params(st + 2 * g.code_bytes + g.key_params, page + l.value_params, r0,
                    l.value_groups, l.page_size, lane);
  }
  // Channels [8·lc, 8·lc + 8) of residual slot `slot` (zeros outside [s0, s1)).
  __device__ __forceinline__ void residual8(uint4& k, uint4& v, int slot, int s0, int s1,
                                            int lc) const {
    k = v = make_uint4(0u, 0u, 0u, 0u);
    if (slot >= s0 && slot < s1) {
      const long off = static_cast<long>(slot - quantized) * D + lc * 8;
      k = *reinterpret_cast<const uint4*>(r_k + off);
      v = *reinterpret_cast<const uint4*>(r_v + off);
    }
  }
  __device__ __forceinline__ uint32_t ready(unsigned char* warp_smem, int stage, int t0, int s0,
                                            int s1, int lane) const {
    constexpr int CPR = D / 8, RPP = 32 / CPR;
    bf16* sK = reinterpret_cast<bf16*>(warp_smem);
    bf16* sV = sK + kTileRows * D;
    const int lc = lane % CPR, lr = lane / CPR;
    if (t0 >= quantized) {
      uint4 k[kTileRows / RPP], v[kTileRows / RPP];
#pragma unroll
      for (int j = 0; j < kTileRows / RPP; ++j)
        residual8(k[j], v[j], t0 + lr + j * RPP, s0, s1, lc);
#pragma unroll
      for (int j = 0; j < kTileRows / RPP; ++j) {
        *reinterpret_cast<uint4*>(sK + swz<D>(lr + j * RPP, lc)) = k[j];
        *reinterpret_cast<uint4*>(sV + swz<D>(lr + j * RPP, lc)) = v[j];
      }
    } else {
      const KvQuantPageLayout& l = layout;
      const TileStage& g = stage_geometry;
      const unsigned char* st = stage_at(warp_smem, stage);
      const int r0 = t0 % l.page_size;
      const long c0 = kernels::KvRowOffset(l, r0);
      const float* key_scale = reinterpret_cast<const float*>(st + 2 * g.code_bytes);
      const float* key_zero = key_scale + g.key_rows * l.key_groups;
      const float* value_scale = key_zero + g.key_rows * l.key_groups;
      const float* value_zero = value_scale + kTileRows * l.value_groups;
      int key_row = -1;  // the stage's row of ks, kz: per channel the tier (a lane's rows go up,
                         // so the tiers do), per token the tile's row
      float ks[8], kz[8];
#pragma unroll
      for (int j = 0; j < kTileRows / RPP; ++j) {
        const int r = lr + j * RPP, slot = t0 + r, row = r0 + r;
        uint4 kw, vw;
        if (slot >= quantized) {  // past a partly filled last page: the residual's
          residual8(kw, vw, slot, s0, s1, lc);
        } else {
          const int kr = l.token_keys ? r : kernels::KvKeyTier(l, row);
          if (kr != key_row) {
            key_row = kr;
            group_params(ks, kz, key_scale + kr * l.key_groups, key_zero + kr * l.key_groups, lc,
                         key_group_shift);
          }
          const int bits = kernels::KvRowBits(l, row);
          const long codes = kernels::KvRowOffset(l, row) - c0 + lc * bits;
          float vs[8], vz[8], k[8], v[8];
          group_params(vs, vz, value_scale + r * l.value_groups, value_zero + r * l.value_groups,
                       lc, value_group_shift);
          dequantize8(k, bits, st + codes, ks, kz);
          dequantize8(v, bits, st + g.code_bytes + codes, vs, vz);
          kw = vw = make_uint4(0u, 0u, 0u, 0u);
          if (slot >= s0 && slot < s1) {
            kw = make_uint4(pack_bf16(k[0], k[1]), pack_bf16(k[2], k[3]), pack_bf16(k[4], k[5]),
                            pack_bf16(k[6], k[7]));
            vw = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]),
                            pack_bf16(v[6], v[7]));
          }
        }
        *reinterpret_cast<uint4*>(sK + swz<D>(r, lc)) = kw;
        *reinterpret_cast<uint4*>(sV + swz<D>(r, lc)) = vw;
      }
    }
    __syncwarp();  // the whole tile is written before any lane's ldmatrix reads it
    return smem_u32(sK);
  }
};

struct Params : Common {
  const uint8_t* pages;
  KvQuantPageLayout layout;
  const int32_t* page_table;
  const int* q_lengths;
  int max_pages;
  const bf16* r_k_pool;
  const bf16* r_v_pool;
  const int32_t* residual_block;
  const int* r_lengths;
  int residual_slots;
  int key_group_shift, value_group_shift;
  TileStage stage_geometry;  // tensor-core path only
  int warp_bytes;            // tensor-core path only
  __device__ __forceinline__ int length(long head) const {
    return q_lengths[head] + r_lengths[head];
  }
  template <int D>
  __device__ __forceinline__ QuantRows<D> rows(long head) const {
    const long block = static_cast<long>(residual_block[head]) * residual_slots * D;
    return QuantRows<D>{pages,           layout,           page_table + head * max_pages,
                        q_lengths[head], r_k_pool + block, r_v_pool + block,
                        key_group_shift, value_group_shift};
  }
  template <int D>
  __device__ __forceinline__ QuantTiles<D> tiles(long head) const {
    const long block = static_cast<long>(residual_block[head]) * residual_slots * D;
    return QuantTiles<D>{pages,           layout,           page_table + head * max_pages,
                         q_lengths[head], r_k_pool + block, r_v_pool + block,
                         key_group_shift, value_group_shift, stage_geometry};
  }
  template <int D>
  __device__ __forceinline__ int mma_warp_bytes() const {
    return warp_bytes;
  }
};

// A warp's shared bytes on the tensor-core path: its bf16 tile, its stages, and at least what
// the epilogue needs.
template <int D>
int quant_warp_bytes(const TileStage& stage) {
  return std::max(QuantTiles<D>::kTileBytes + QuantTiles<D>::kStages * stage.bytes,
                  mma_epilogue_bytes(D));
}

// The most shared memory a block may take (opt-in), which the tensor-core kernels are allowed.
int g_max_mma_smem = 0;

}  // namespace

void decode::configure_quantized_mma_kernels() {
  if (g_max_mma_smem > 0) return;
  int device = 0, optin = 0;
  DMC_CUDA_CHECK(cudaGetDevice(&device));
  DMC_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  allow_mma_smem<64, Params>(static_cast<size_t>(optin));
  allow_mma_smem<128, Params>(static_cast<size_t>(optin));
  g_max_mma_smem = optin;
}

void paged_decode_attention_quantized(bf16* out, float* probs, int probs_stride, const bf16* q,
                                      const uint8_t* pages, const KvQuantPageLayout& layout,
                                      const int32_t* page_table, const int* q_lengths,
                                      int max_pages, const bf16* r_k_pool, const bf16* r_v_pool,
                                      const int32_t* residual_block, const int* r_lengths,
                                      int residual_slots, int B, int H, int Hkv, int D,
                                      bool exclude_ctrl, float scale, cudaStream_t stream,
                                      int split_slots) {
  constexpr const char* kOp = "paged_decode_attention_quantized";
  if (B <= 0 || H <= 0) return;
  if (D != 64 && D != 128) fail(kOp, "head dim must be 64 or 128");
  if (layout.head_dim != D) fail(kOp, "the page layout's head_dim is not D");
  for (int bits : {layout.bits, layout.salient_slots > 0 ? layout.salient_bits : 8})
    if (bits != 2 && bits != 4 && bits != 8) fail(kOp, "bits must be 2, 4 or 8");
  // Groups of 2^shift channels (keys per channel: groups of one).
  auto group_shift = [&](int group) {
    int shift = 0;
    while ((1 << shift) < group) ++shift;
    if (group <= 0 || (1 << shift) != group || D % group != 0)
      fail(kOp, "the key and value groups must be powers of 2 dividing the head dim");
    return shift;
  };
  const int key_group_shift = group_shift(layout.key_group);
  const int value_group_shift = group_shift(layout.value_group);
  if (Hkv <= 0 || H % Hkv != 0) fail(kOp, "H must be a multiple of Hkv");
  if (layout.page_size <= 0 || max_pages <= 0 || residual_slots < 0)
    fail(kOp, "page_size and max_pages must be positive, residual_slots not negative");
  if (probs != nullptr && probs_stride <= 0) fail(kOp, "probs_stride must be positive");
  if ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(out) |
       reinterpret_cast<uintptr_t>(r_k_pool) | reinterpret_cast<uintptr_t>(r_v_pool)) & 15u)
    fail(kOp, "q, out, r_k_pool and r_v_pool must be 16-byte aligned");
  if ((reinterpret_cast<uintptr_t>(pages) & 3u) || layout.bytes % 4 != 0)
    fail(kOp, "the pages must be 4-byte aligned");
  const int G = H / Hkv;
  // The tensor-core path needs whole 16-slot tiles per page and 16-byte aligned page regions
  // (true of every layout with page_size % 16 == 0 at D 64 or 128; checked all the same), and
  // a ring that fits in shared memory.
  configure_quantized_mma_kernels();
  const TileStage stage = tile_stage(layout);
  const int warp_bytes = D == 64 ? quant_warp_bytes<64>(stage) : quant_warp_bytes<128>(stage);
  const size_t smem = mma_smem_bytes(D, warp_bytes);
  const bool tensor_cores =
      G >= 4 && G <= 16 && layout.page_size % kTileRows == 0 &&
      (reinterpret_cast<uintptr_t>(pages) & 15u) == 0 &&
      (layout.bytes | layout.key_codes | layout.value_codes | layout.key_params |
       layout.value_params) % 16 == 0 &&
      smem <= static_cast<size_t>(g_max_mma_smem);
  Params p{};
  p.pages = pages;
  p.layout = layout;
  p.page_table = page_table;
  p.q_lengths = q_lengths;
  p.max_pages = max_pages;
  p.r_k_pool = r_k_pool;
  p.r_v_pool = r_v_pool;
  p.residual_block = residual_block;
  p.r_lengths = r_lengths;
  p.residual_slots = residual_slots;
  p.key_group_shift = key_group_shift;
  p.value_group_shift = value_group_shift;
  p.stage_geometry = stage;
  p.warp_bytes = warp_bytes;
  launch_decode(p, kOp, out, probs, probs_stride, q, B, H, Hkv, D, exclude_ctrl, scale,
                tensor_cores, static_cast<long>(max_pages) * layout.page_size + residual_slots,
                split_slots, smem, stream);
}

}  // namespace dmc::cuda
