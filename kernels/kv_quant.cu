// Quantization of KV cache pages on the GPU (spec: kernels/kv_quant.h): the page a head's
// full-precision residual closes, written in the layout the quantized decode attention reads.
// One CTA per page (an entry of negative page id returns at once), in two passes:
//   1. the groups' scales and zero points: a thread per (key tier, channel), then per (row,
//      value group), each taking its group's min and max and storing KvGroupParams into the page;
//   2. the codes: a thread per byte of packed codes, which codes its 8 / bits channels against
//      the stored parameters (read back from the page after a barrier) and writes the byte whole.
// The rule is the CPU's, in the same precision (min and max exact, the step and the code in
// double, round half to even through the shared KvGroupParams and KvCode), so the bytes are those
// of kernels::kv_quantize_page on the same bf16 rows. Nothing here reduces in an order that could
// vary, so the result is deterministic. A page is written once per page_size tokens of a head:
// the kernel is far from any decode step's critical path, and plain loops keep it simple.
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

struct Sources {
  const bf16* k_rows;
  const bf16* v_rows;
  const int32_t* rows;  // [n, page_size]
};

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
    double lo = key(r0, c), hi = lo;
    for (int r = r0 + 1; r < r1; ++r) {
      lo = fmin(lo, static_cast<double>(key(r, c)));
      hi = fmax(hi, static_cast<double>(key(r, c)));
    }
    kernels::KvGroupParams(lo, hi, salient ? l.salient_bits : l.bits, key_scale + i,
                           key_zero + i);
  }
  // Values: row r, channels [g·G, (g + 1)·G).
  for (int i = threadIdx.x; i < P * l.value_groups; i += blockDim.x) {
    const int r = i / l.value_groups, c0 = (i - r * l.value_groups) * G;
    double lo = value(r, c0), hi = lo;
    for (int c = c0 + 1; c < c0 + G; ++c) {
      lo = fmin(lo, static_cast<double>(value(r, c)));
      hi = fmax(hi, static_cast<double>(value(r, c)));
    }
    kernels::KvGroupParams(lo, hi, kernels::KvRowBits(l, r), value_scale + i, value_zero + i);
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
    const int bits = kernels::KvRowBits(l, r), per_byte = 8 / bits;
    const int c0 = static_cast<int>(i - kernels::KvRowOffset(l, r)) * per_byte;
    const int tier = kernels::KvKeyTier(l, r);
    uint32_t kbyte = 0, vbyte = 0;
    for (int j = 0; j < per_byte; ++j) {
      const int c = c0 + j, g = r * l.value_groups + c / G;
      const int kt = tier * D + c;
      kbyte |= static_cast<uint32_t>(kernels::KvCode(key(r, c), key_scale[kt], key_zero[kt], bits))
               << (j * bits);
      vbyte |= static_cast<uint32_t>(
                   kernels::KvCode(value(r, c), value_scale[g], value_zero[g], bits))
               << (j * bits);
    }
    page[l.key_codes + i] = static_cast<uint8_t>(kbyte);
    page[l.value_codes + i] = static_cast<uint8_t>(vbyte);
  }
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "kv_quantize_pages: %s\n", what);
  std::abort();
}

}  // namespace

void kv_quantize_pages(uint8_t* pages, const KvQuantPageLayout& layout, const int32_t* page_ids,
                       const bf16* k_rows, const bf16* v_rows, const int32_t* rows, int n,
                       cudaStream_t stream) {
  if (n <= 0) return;
  for (int bits : {layout.bits, layout.salient_slots > 0 ? layout.salient_bits : 8})
    if (bits != 2 && bits != 4 && bits != 8) fail("bits must be 2, 4 or 8");
  if (layout.page_size <= 0 || layout.head_dim <= 0 || layout.value_group <= 0 ||
      layout.head_dim % layout.value_group != 0)
    fail("not a page layout of kernels::kv_quant_page_layout");
  if (layout.head_dim * layout.bits % 8 != 0 || layout.head_dim * layout.salient_bits % 8 != 0)
    fail("head_dim x bits must be a whole number of bytes");
  if (layout.key_params % 4 != 0 || layout.bytes % 4 != 0 ||
      (reinterpret_cast<uintptr_t>(pages) & 3u))
    fail("the pages' scales and zero points must be 4-byte aligned");
  quantize_page_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      pages, layout, page_ids, Sources{k_rows, v_rows, rows});
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
