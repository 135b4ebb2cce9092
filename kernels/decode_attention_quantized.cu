// Paged decode attention over a quantized KV cache on the GPU (spec: kernels/decode_attention.h,
// paged_decode_attention_quantized; the page layout: kernels/kv_quant.h). It runs the CUDA-core
// kernel of decode_attention_cuda.h (one CTA per (sequence, KV head, group of up to 4 query heads)
// and chunk of slots, online softmax in base 2, split heads merged by the combine kernel) over a
// head's slots in the CPU reference's order: its full quantized pages, then its residual block.
// As over a bf16 pool, D/8 threads share a row and each reads 8 channels of it:
//   quantized row  its 8 key and 8 value codes (8·bits bits each, at most two 4-byte loads: a
//                  page is only 4-byte aligned), the scales and zero points of those channels'
//                  key tier and of the row's value groups, through the read-only cache (the rows
//                  of a page share them), dequantized to fp32 as zero + code·scale, rounded as the
//                  CPU reference rounds it (a multiply, then an add: no fused multiply-add);
//   residual row   one 16-byte load of 8 bf16 channels each of key and value.
// Dequantized rows live only in registers. Every GQA group runs on CUDA cores (the tensor-core
// kernel of decode_attention.cu stages bf16 tiles with cp.async, which dequantization would have
// to go through first). Fixed chunks and reduction order: deterministic.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "kernels/decode_attention_cuda.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using namespace decode;
using kernels::KvQuantPageLayout;

// The 8 codes of `bits` bits that start at byte p, code j at bits [j·bits, (j + 1)·bits).
__device__ __forceinline__ uint64_t load_codes(const uint8_t* p, int bits) {
  if (bits == 8)
    return __ldg(reinterpret_cast<const uint32_t*>(p)) |
           static_cast<uint64_t>(__ldg(reinterpret_cast<const uint32_t*>(p) + 1)) << 32;
  if (bits == 4) return __ldg(reinterpret_cast<const uint32_t*>(p));
  return __ldg(reinterpret_cast<const uint16_t*>(p));
}

// x = zero + code · scale in fp32, rounded twice as in kernels::kv_dequantize_row.
__device__ __forceinline__ float dequantize(uint32_t code, float scale, float zero) {
  return __fadd_rn(zero, __fmul_rn(static_cast<float>(code), scale));
}

// One head: slot i < quantized is row i % P of page table[i / P]; slot quantized + j is row j of
// the head's residual block.
template <int D>
struct QuantRows {
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
  __device__ __forceinline__ Raw fetch(int slot, int cl) const {
    Raw r;
    if (slot >= quantized) {
      const long off = static_cast<long>(slot - quantized) * D + cl * 8;
      unpack8(r.k, *reinterpret_cast<const uint4*>(r_k + off));
      unpack8(r.v, *reinterpret_cast<const uint4*>(r_v + off));
      return r;
    }
    const KvQuantPageLayout& l = layout;
    const int row = slot % l.page_size, bits = kernels::KvRowBits(l, row);
    const uint8_t* page = pages + static_cast<long>(table[slot / l.page_size]) * l.bytes;
    const long codes = kernels::KvRowOffset(l, row) + cl * bits;  // channel 8·cl's byte
    const uint64_t kc = load_codes(page + l.key_codes + codes, bits);
    const uint64_t vc = load_codes(page + l.value_codes + codes, bits);
    const float* key_scale = reinterpret_cast<const float*>(page + l.key_params) +
                             kernels::KvKeyTier(l, row) * D + cl * 8;
    const float* key_zero = key_scale + l.key_tiers * D;
    const float* value_scale =
        reinterpret_cast<const float*>(page + l.value_params) + row * l.value_groups;
    const float* value_zero = value_scale + l.page_size * l.value_groups;
    const uint32_t mask = (1u << bits) - 1;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int g = (cl * 8 + c) >> value_group_shift;
      r.k[c] = dequantize(static_cast<uint32_t>(kc >> (c * bits)) & mask, __ldg(key_scale + c),
                          __ldg(key_zero + c));
      r.v[c] = dequantize(static_cast<uint32_t>(vc >> (c * bits)) & mask,
                          __ldg(value_scale + g), __ldg(value_zero + g));
    }
    return r;
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
};

}  // namespace

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
  const int G = H / Hkv, GT = cuda_core_heads(G);
  const long ctas = static_cast<long>(B) * Hkv * (G / GT);
  if (ctas > 0x7fffffffL) fail(kOp, "too many (sequence, KV head) pairs for one launch");

  Params p{};
  p.out = out;
  p.probs = probs;
  p.probs_stride = probs_stride;
  p.q = q;
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
  p.H = H;
  p.Hkv = Hkv;
  p.G = G;
  p.scale_log2 = scale * kLog2e;
  p.exclude_ctrl = exclude_ctrl;
  plan_chunks(p, kOp, ctas,
              static_cast<long>(max_pages) * layout.page_size + residual_slots, split_slots, B, D);
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(p.splits));
  if (D == 64)
    launch_cuda_cores<64>(p, GT, grid, stream);
  else
    launch_cuda_cores<128>(p, GT, grid, stream);
  launch_combine(p, B, D, stream);
}

}  // namespace dmc::cuda
