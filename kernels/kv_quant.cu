// Quantization of KV cache pages on the GPU (spec: kernels/kv_quant.h), in the layout the quantized
// decode attention reads.
// kv_quantize_pages: the page a head's full-precision residual closes (keys per channel). One CTA
// per page (an entry of negative page id returns at once), in two passes:
//   1. the groups' scales and zero points: a thread per (key tier, channel), then per (row,
//      value group), each taking its group's min and max and storing KvGroupParams into the page;
//   2. the codes: a thread per byte of packed codes, which codes its 8 / bits channels against
//      the stored parameters (read back from the page after a barrier) and writes the byte whole.
// kv_quantize_rows: the rows that settle into their heads' last pages (keys per token). One warp
// per row, kRowWarps rows to a CTA, in the same two passes over its row: a lane per key group,
// then per value group; a lane per byte of its key and value codes. Rows are independent (their
// codes are whole bytes, their parameters floats of their own), so the rows of one page may be
// written by one launch, in any order.
// The rule is the CPU's, in the same precision (min and max exact, the step and the code in
// double, round half to even through the shared KvGroupParams and KvCode), so the bytes are those
// of kernels::kv_quantize_page (kv_quantize_row) on the same bf16 rows. Nothing here reduces in
// an order that could vary, so the result is deterministic. A head writes a page per page_size
// tokens, or a row per token: either is far from any decode step's critical path, and plain
// loops keep it simple.
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using kernels::KvQuantPageLayout;

constexpr int kThreads = 128;
constexpr int kRowWarps = 4;

struct Sources {
  const bf16* k_rows;
  const bf16* v_rows;
  const int32_t* rows;  // kv_quantize_pages: [n, page_size]; kv_quantize_rows: [n]
};

// KvGroupParams of the group x(0) .. x(n − 1), stored at *scale and *zero.
template <class X>
__device__ void store_group_params(X x, int n, int bits, float* scale, float* zero) {
  double lo = x(0), hi = lo;
  for (int i = 1; i < n; ++i) {
    lo = fmin(lo, static_cast<double>(x(i)));
    hi = fmax(hi, static_cast<double>(x(i)));
  }
  kernels::KvGroupParams(lo, hi, bits, scale, zero);
}

// The byte of packed codes of channels c0 .. c0 + 8 / bits − 1, code(c) each.
template <class Code>
__device__ uint8_t code_byte(Code code, int c0, int bits) {
  uint32_t byte = 0;
  for (int j = 0; j < 8 / bits; ++j) byte |= static_cast<uint32_t>(code(c0 + j)) << (j * bits);
  return static_cast<uint8_t>(byte);
}

__global__ void __launch_bounds__(kThreads)
    quantize_page_kernel(uint8_t* pages, const KvQuantPageLayout l, const int32_t* page_ids,
                         const Sources src) {
  const int P = l.page_size, D = l.head_dim, G = l.value_group;
  if (page_ids[blockIdx.x] < 0) return;  // this entry's head closes no page
  uint8_t* page = pages + static_cast<long>(page_ids[blockIdx.x]) * l.bytes;
  const int32_t* rows = src.rows + static_cast<long>(blockIdx.x) * P;
  auto key = [&](int r, int c) { return bf(src.k_rows[static_cast<long>(rows[r]) * D + c]); };
  auto value = [&](int r, int c) { return bf(src.v_rows[static_cast<long>(rows[r]) * D + c]); };
  float* key_scale = reinterpret_cast<float*>(page + l.key_params);
  float* key_zero = key_scale + l.key_tiers * D;
  float* value_scale = reinterpret_cast<float*>(page + l.value_params);
  float* value_zero = value_scale + static_cast<long>(P) * l.value_groups;

  // Pass 1. Keys: channel c over the rows of one tier; the tiers present are numbered from 0.
  for (int i = threadIdx.x; i < l.key_tiers * D; i += blockDim.x) {
    const int index = i / D, c = i - index * D;
    const bool salient = index == 0 && l.salient_slots > 0;
    const int r0 = salient ? 0 : l.salient_slots, r1 = salient ? l.salient_slots : P;
    store_group_params([&](int j) { return key(r0 + j, c); }, r1 - r0,
                       salient ? l.salient_bits : l.bits, key_scale + i, key_zero + i);
  }
  // Values: row r, channels [g·G, (g + 1)·G).
  for (int i = threadIdx.x; i < P * l.value_groups; i += blockDim.x) {
    const int r = i / l.value_groups, c0 = (i - r * l.value_groups) * G;
    store_group_params([&](int j) { return value(r, c0 + j); }, G, kernels::KvRowBits(l, r),
                       value_scale + i, value_zero + i);
  }
  __syncthreads();  // the parameters just stored are what pass 2 codes against

  // Pass 2: byte i of the key codes and byte i of the value codes (the two regions have the same
  // row layout). Row r's bytes start at KvRowOffset(l, r): the salient rows first, then the rest.
  const long salient_row_bytes = kernels::KvCodeRowBytes(D, l.salient_bits);
  const long salient_bytes = l.salient_slots * salient_row_bytes;
  const long row_bytes = kernels::KvCodeRowBytes(D, l.bits);
  const long code_bytes = kernels::KvRowOffset(l, P);
  for (long i = threadIdx.x; i < code_bytes; i += blockDim.x) {
    const int r = i < salient_bytes
                      ? static_cast<int>(i / salient_row_bytes)
                      : l.salient_slots + static_cast<int>((i - salient_bytes) / row_bytes);
    const int bits = kernels::KvRowBits(l, r);
    const int c0 = static_cast<int>(i - kernels::KvRowOffset(l, r)) * (8 / bits);
    const int kt = kernels::KvKeyTier(l, r) * D, g = r * l.value_groups;
    page[l.key_codes + i] = code_byte(
        [&](int c) {
          return kernels::KvCode(key(r, c), key_scale[kt + c], key_zero[kt + c], bits);
        },
        c0, bits);
    page[l.value_codes + i] = code_byte(
        [&](int c) {
          return kernels::KvCode(value(r, c), value_scale[g + c / G], value_zero[g + c / G], bits);
        },
        c0, bits);
  }
}

__global__ void __launch_bounds__(kRowWarps * 32)
    quantize_row_kernel(uint8_t* pages, const KvQuantPageLayout l, const int32_t* page_ids,
                        const int32_t* page_rows, const Sources src, int n) {
  const int j = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (j >= n || page_ids[j] < 0) return;  // uniform over the warp; a negative id writes nothing
  const int P = l.page_size, D = l.head_dim, row = page_rows[j], bits = kernels::KvRowBits(l, row);
  uint8_t* page = pages + static_cast<long>(page_ids[j]) * l.bytes;
  const bf16* key = src.k_rows + static_cast<long>(src.rows[j]) * D;
  const bf16* value = src.v_rows + static_cast<long>(src.rows[j]) * D;
  float* key_scale = reinterpret_cast<float*>(page + l.key_params) + row * l.key_groups;
  float* key_zero = key_scale + P * l.key_groups;
  float* value_scale = reinterpret_cast<float*>(page + l.value_params) + row * l.value_groups;
  float* value_zero = value_scale + P * l.value_groups;

  // Pass 1: key group i, then value group i − key_groups.
  for (int i = lane; i < l.key_groups + l.value_groups; i += 32) {
    const bool is_key = i < l.key_groups;
    const int g = is_key ? i : i - l.key_groups, G = is_key ? l.key_group : l.value_group;
    const bf16* x = (is_key ? key : value) + g * G;
    float* scale = (is_key ? key_scale : value_scale) + g;
    float* zero = (is_key ? key_zero : value_zero) + g;
    store_group_params([&](int c) { return bf(x[c]); }, G, bits, scale, zero);
  }
  __syncwarp();  // the parameters just stored are what pass 2 codes against

  // Pass 2: byte i of the row's key codes and of its value codes.
  const long offset = kernels::KvRowOffset(l, row);
  for (int i = lane; i < kernels::KvCodeRowBytes(D, bits); i += 32) {
    const int c0 = i * (8 / bits), kg = l.key_group, vg = l.value_group;
    page[l.key_codes + offset + i] = code_byte(
        [&](int c) {
          return kernels::KvCode(bf(key[c]), key_scale[c / kg], key_zero[c / kg], bits);
        },
        c0, bits);
    page[l.value_codes + offset + i] = code_byte(
        [&](int c) {
          return kernels::KvCode(bf(value[c]), value_scale[c / vg], value_zero[c / vg], bits);
        },
        c0, bits);
  }
}

[[noreturn]] void fail(const char* op, const char* what) {
  std::fprintf(stderr, "%s: %s\n", op, what);
  std::abort();
}

// What both kernels need of a layout and of the pool.
void check_layout(const char* op, const KvQuantPageLayout& layout, const uint8_t* pages) {
  for (int bits : {layout.bits, layout.salient_slots > 0 ? layout.salient_bits : 8})
    if (bits != 2 && bits != 4 && bits != 8) fail(op, "bits must be 2, 4 or 8");
  if (layout.page_size <= 0 || layout.head_dim <= 0 || layout.value_group <= 0 ||
      layout.head_dim % layout.value_group != 0 || layout.key_group <= 0 ||
      layout.head_dim % layout.key_group != 0)
    fail(op, "not a page layout of kernels::kv_quant_page_layout");
  if (layout.head_dim * layout.bits % 8 != 0 || layout.head_dim * layout.salient_bits % 8 != 0)
    fail(op, "head_dim x bits must be a whole number of bytes");
  if (layout.key_params % 4 != 0 || layout.bytes % 4 != 0 ||
      (reinterpret_cast<uintptr_t>(pages) & 3u))
    fail(op, "the pages' scales and zero points must be 4-byte aligned");
}

}  // namespace

void kv_quantize_pages(uint8_t* pages, const KvQuantPageLayout& layout, const int32_t* page_ids,
                       const bf16* k_rows, const bf16* v_rows, const int32_t* rows, int n,
                       cudaStream_t stream) {
  constexpr const char* kOp = "kv_quantize_pages";
  if (n <= 0) return;
  check_layout(kOp, layout, pages);
  if (layout.token_keys) fail(kOp, "keys per token are written a row at a time: kv_quantize_rows");
  quantize_page_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      pages, layout, page_ids, Sources{k_rows, v_rows, rows});
  DMC_CUDA_CHECK_LAUNCH();
}

void kv_quantize_rows(uint8_t* pages, const KvQuantPageLayout& layout, const int32_t* page_ids,
                      const int32_t* page_rows, const bf16* k_rows, const bf16* v_rows,
                      const int32_t* rows, int n, cudaStream_t stream) {
  constexpr const char* kOp = "kv_quantize_rows";
  if (n <= 0) return;
  check_layout(kOp, layout, pages);
  if (!layout.token_keys) fail(kOp, "keys per channel are written a page at a time");
  quantize_row_kernel<<<static_cast<unsigned>(ceil_div(n, kRowWarps)), kRowWarps * 32, 0,
                        stream>>>(pages, layout, page_ids, page_rows,
                                  Sources{k_rows, v_rows, rows}, n);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
