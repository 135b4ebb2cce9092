// Paged decode attention over a quantized KV cache on the GPU (spec: kernels/decode_attention.h,
// paged_decode_attention_quantized; the page layout: kernels/kv_quant.h). It runs the kernels of
// decode_attention_cuda.h over a head's slots in the CPU reference's order, its full quantized
// pages, then its residual block: the tensor-core kernel for GQA groups of 4 to 16 when a page
// holds whole 16-slot tiles, the CUDA-core kernel otherwise; chunks (flash-decoding), the
// combine kernel and the fixed reduction order (deterministic) are theirs.
// Dequantization is the CPU reference's x = zero + code·scale in fp32, a multiply then an add
// (no fused multiply-add), so both paths see the CPU's values before their own rounding.
//
// Tensor-core path (page_size a multiple of 16): tiles start at multiples of 16 of the head's
//   slots, so a tile lies in one page, or in the residual block (the quantized slots are whole
//   pages), whatever the chunk; the tile's slots outside the chunk are masked. A warp's ring
//   stage holds the raw bytes of one tile, copied with cp.async in 16-byte pieces (the tile's
//   rows are contiguous in each region of the page, every region 16-byte aligned):
//     key codes of the 16 rows | value codes | the page's key scales and zeros (every tier) |
//     the 16 rows' value scales | their value zeros
//   so the parameters are loaded once per tile, not per row. When a tile is due, each lane
//   dequantizes 8 channels of 16/RPP rows (a key tier's 8 scales and zeros read once per tier)
//   and writes them, rounded to bf16, into the warp's bf16 K and V tile [16][D] in the swizzled
//   layout the bf16 pool's tiles have; the mma products read them there. The values thus enter
//   the products in bf16, as the bf16 pool's do. Residual tiles (at most two per head) are read
//   straight into that tile with 16-byte loads when due, not through the ring.
// CUDA-core path: D/8 threads share a row, 8 channels each, as over a bf16 pool, and a row group
//   takes kUnroll consecutive slots per step, so a page's key scales and zeros for its channels
//   are loaded once for them (again when the page or the key tier changes); per row: its 8 key
//   and 8 value codes (8·bits bits each, at most two 4-byte loads: a page is only 4-byte aligned
//   here) and the value scale and zero of its groups. Residual rows: one 16-byte load each of
//   key and value. The values stay fp32.
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

// The value scales and zero points of channels [8·cl, 8·cl + 8) of one row, whose groups of
// 2^shift channels have theirs at scale_row[g], zero_row[g].
__device__ __forceinline__ void value_params(float (&scale)[8], float (&zero)[8],
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

__device__ __forceinline__ void load8f(float (&f)[8], const float* p) {  // p 4-byte aligned
#pragma unroll
  for (int c = 0; c < 8; ++c) f[c] = p[c];
}
__device__ __forceinline__ void load8f_16(float (&f)[8], const float* p) {  // 16-byte aligned
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x;
  f[1] = a.y;
  f[2] = a.z;
  f[3] = a.w;
  f[4] = b.x;
  f[5] = b.y;
  f[6] = b.z;
  f[7] = b.w;
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
  int value_group_shift;  // value_group = 1 << value_group_shift
  struct Raw {
    float k[8], v[8];
  };
  template <int U>
  __device__ __forceinline__ void fetch(Raw (&raw)[U], const int (&slot)[U],
                                        const bool (&valid)[U], int cl) const {
    const KvQuantPageLayout& l = layout;
    int params_of = -1;  // 2·(page-table index) + key tier of ks, kz
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
      const int tier = kernels::KvKeyTier(l, row);
      if (2 * index + tier != params_of) {
        params_of = 2 * index + tier;
        const float* key_scale =
            reinterpret_cast<const float*>(page + l.key_params) + tier * D + cl * 8;
        load8f(ks, key_scale);
        load8f(kz, key_scale + l.key_tiers * D);
      }
      const int bits = kernels::KvRowBits(l, row);
      const long codes = kernels::KvRowOffset(l, row) + cl * bits;  // channel 8·cl's byte
      const float* value_scale =
          reinterpret_cast<const float*>(page + l.value_params) + row * l.value_groups;
      float vs[8], vz[8];
      value_params(vs, vz, value_scale, value_scale + l.page_size * l.value_groups, cl,
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
  int key_params;   // bytes of the page's key scales and zeros
  int value_params; // bytes of the 16 rows' value scales (the zeros as many again)
  int bytes;        // the whole stage
};
inline TileStage tile_stage(const KvQuantPageLayout& l) {
  TileStage t;
  const int widest = std::max(l.bits, l.salient_slots > 0 ? l.salient_bits : 0);
  t.code_bytes = kTileRows * static_cast<int>(kernels::KvCodeRowBytes(l.head_dim, widest));
  t.key_params = 2 * l.key_tiers * l.head_dim * static_cast<int>(sizeof(float));
  t.value_params = kTileRows * l.value_groups * static_cast<int>(sizeof(float));
  t.bytes = 2 * t.code_bytes + t.key_params + 2 * t.value_params;
  return t;
}

// Copies n bytes (a multiple of 16, both ends 16-byte aligned) with the warp's cp.async.
__device__ __forceinline__ void copy_async(unsigned char* dst, const uint8_t* src, int n,
                                           int lane) {
  for (int o = lane * 16; o < n; o += 32 * 16) cp_async16(dst + o, src + o, true);
}

// One head for the tensor-core kernel (the slots as in QuantRows). A warp's shared region: its
// bf16 K and V tile [16][D] each, then kStages stages of TileStage bytes.
template <int D>
struct QuantTiles {
  static constexpr int kStages = D == 64 ? 4 : 3;
  static constexpr bool kAligned = true;  // a tile lies in one page or in the residual block
  static constexpr int kTileBytes = static_cast<int>(sizeof(bf16)) * 2 * kTileRows * D;
  const uint8_t* pages;
  KvQuantPageLayout layout;
  const int32_t* table;
  int quantized;
  const bf16* r_k;  // the head's residual block
  const bf16* r_v;
  int value_group_shift;
  TileStage stage_geometry;

  __device__ __forceinline__ unsigned char* stage_at(unsigned char* warp_smem, int stage) const {
    return warp_smem + kTileBytes + stage * stage_geometry.bytes;
  }
  // The quantized tile [t0, t0 + 16) = rows [r0, r0 + 16) of one page, raw, into the stage;
  // residual tiles wait for ready().
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
    const long values = l.value_params + static_cast<long>(r0) * l.value_groups * sizeof(float);
    const long value_zeros = values + static_cast<long>(l.page_size) * l.value_groups * sizeof(float);
    copy_async(st, page + l.key_codes + c0, codes, lane);
    copy_async(st + g.code_bytes, page + l.value_codes + c0, codes, lane);
    copy_async(st + 2 * g.code_bytes, page + l.key_params, g.key_params, lane);
    copy_async(st + 2 * g.code_bytes + g.key_params, page + values, g.value_params, lane);
    copy_async(st + 2 * g.code_bytes + g.key_params + g.value_params, page + value_zeros,
               g.value_params, lane);
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
      for (int j = 0; j < kTileRows / RPP; ++j) {
        const int slot = t0 + lr + j * RPP;
        k[j] = v[j] = make_uint4(0u, 0u, 0u, 0u);
        if (slot >= s0 && slot < s1) {
          const long off = static_cast<long>(slot - quantized) * D + lc * 8;
          k[j] = *reinterpret_cast<const uint4*>(r_k + off);
          v[j] = *reinterpret_cast<const uint4*>(r_v + off);
        }
      }
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
      const float* key_zero = key_scale + l.key_tiers * D;
      const float* value_scale = key_zero + l.key_tiers * D;
      const float* value_zero = value_scale + kTileRows * l.value_groups;
      int tier = -1;  // of ks, kz (a lane's rows go up, so the tiers do)
      float ks[8], kz[8];
#pragma unroll
      for (int j = 0; j < kTileRows / RPP; ++j) {
        const int r = lr + j * RPP, slot = t0 + r, row = r0 + r;
        const int t = kernels::KvKeyTier(l, row);
        if (t != tier) {
          tier = t;
          load8f_16(ks, key_scale + t * D + lc * 8);
          load8f_16(kz, key_zero + t * D + lc * 8);
        }
        const int bits = kernels::KvRowBits(l, row);
        const long codes = kernels::KvRowOffset(l, row) - c0 + lc * bits;
        float vs[8], vz[8], k[8], v[8];
        value_params(vs, vz, value_scale + r * l.value_groups, value_zero + r * l.value_groups,
                     lc, value_group_shift);
        dequantize8(k, bits, st + codes, ks, kz);
        dequantize8(v, bits, st + g.code_bytes + codes, vs, vz);
        uint4 kw = make_uint4(0u, 0u, 0u, 0u), vw = kw;
        if (slot >= s0 && slot < s1) {
          kw = make_uint4(pack_bf16(k[0], k[1]), pack_bf16(k[2], k[3]), pack_bf16(k[4], k[5]),
                          pack_bf16(k[6], k[7]));
          vw = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]),
                          pack_bf16(v[6], v[7]));
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
  int value_group_shift;
  TileStage stage_geometry;  // tensor-core path only
  int warp_bytes;            // tensor-core path only
  __device__ __forceinline__ int length(long head) const {
    return q_lengths[head] + r_lengths[head];
  }
  template <int D>
  __device__ __forceinline__ QuantRows<D> rows(long head) const {
    const long block = static_cast<long>(residual_block[head]) * residual_slots * D;
    return QuantRows<D>{pages,           layout,          page_table + head * max_pages,
                        q_lengths[head], r_k_pool + block, r_v_pool + block,
                        value_group_shift};
  }
  template <int D>
  __device__ __forceinline__ QuantTiles<D> tiles(long head) const {
    const long block = static_cast<long>(residual_block[head]) * residual_slots * D;
    return QuantTiles<D>{pages,           layout,           page_table + head * max_pages,
                         q_lengths[head], r_k_pool + block, r_v_pool + block,
                         value_group_shift, stage_geometry};
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
  int value_group_shift = 0;
  while ((1 << value_group_shift) < layout.value_group) ++value_group_shift;
  if (layout.value_group <= 0 || (1 << value_group_shift) != layout.value_group ||
      D % layout.value_group != 0)
    fail(kOp, "the value group must divide the head dim");
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
  p.value_group_shift = value_group_shift;
  p.stage_geometry = stage;
  p.warp_bytes = warp_bytes;
  launch_decode(p, kOp, out, probs, probs_stride, q, B, H, Hkv, D, exclude_ctrl, scale,
                tensor_cores, static_cast<long>(max_pages) * layout.page_size + residual_slots,
                split_slots, smem, stream);
}

}  // namespace dmc::cuda
