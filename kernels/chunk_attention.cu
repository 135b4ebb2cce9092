// Attention of a chunk continuing one sequence's cache on the GPU (spec:
// kernels/chunk_attention.h). Two partial softmaxes, each with its log-sum-exp:
//   prefix  paged_decode_attention with the chunk's n queries as rows sharing the sequence's page
//           table, each with its own lengths prefix[t, ·], unsplit (one CTA per row and KV head
//           reads the whole prefix: no split partials, so no scratch shared with decode steps);
//   chunk   the fused DMC attention over the chunk's keys (causal, the additive mask off the
//           diagonal), as the prefill's parallel forward runs it;
// then out = (e^{lse_p − m} out_p + e^{lse_c − m} out_c) / (e^{lse_p − m} + e^{lse_c − m}),
// m = max(lse_p, lse_c); a query that sees no cached slot has lse_p = −inf and keeps out_c.
#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kPartsSlot = 15;  // detail::scratch slot: the two partial outputs and their lse
constexpr int kCombineThreads = 128;

// One CTA per (query t, head g); lse_p [n, H], lse_c [H, n] (dmc_attention_forward's layout).
__global__ void combine_kernel(bf16* out, const bf16* out_p, const float* lse_p, const bf16* out_c,
                               const float* lse_c, int n, int H, int D) {
  const long tg = blockIdx.x;
  const int t = static_cast<int>(tg / H), g = static_cast<int>(tg % H);
  const float a = lse_p[tg], b = lse_c[static_cast<long>(g) * n + t];
  const float m = fmaxf(a, b);  // finite: the diagonal is always seen
  const float wa = expf(a - m), wb = expf(b - m), inv = 1.f / (wa + wb);
  for (int c = threadIdx.x; c < D; c += blockDim.x)
    out[tg * D + c] = tobf((wa * bf(out_p[tg * D + c]) + wb * bf(out_c[tg * D + c])) * inv);
}

}  // namespace

void chunk_attention(bf16* out, const bf16* q, const bf16* k_pool, const bf16* v_pool,
                     const int32_t* page_table, int max_pages, int page_size, const int* prefix,
                     const bf16* k, const bf16* v, const float* mask, int n, int H, int Hkv, int D,
                     bool exclude_ctrl, float scale, cudaStream_t stream) {
  if (n <= 0) return;
  const size_t rows = static_cast<size_t>(n) * H;
  // out_p, out_c [n, H, D] bf16, then lse_p, lse_c [n · H] fp32 (16-byte aligned: D % 64 == 0).
  char* parts = static_cast<char*>(
      scratch(kPartsSlot, rows * D * 2 * sizeof(bf16) + rows * 2 * sizeof(float)));
  bf16* out_p = reinterpret_cast<bf16*>(parts);
  bf16* out_c = out_p + rows * D;
  float* lse_p = reinterpret_cast<float*>(out_c + rows * D);
  float* lse_c = lse_p + rows;
  paged_decode_attention(out_p, nullptr, 0, q, k_pool, v_pool, page_table, prefix, max_pages,
                         page_size, n, H, Hkv, D, exclude_ctrl, scale, stream,
                         /*split_slots=*/max_pages * page_size, lse_p, /*shared_table=*/true);
  dmc_attention_forward(out_c, lse_c, q, k, v, mask, 1, n, H, Hkv, D, exclude_ctrl, scale, stream);
  combine_kernel<<<static_cast<unsigned>(rows), kCombineThreads, 0, stream>>>(
      out, out_p, lse_p, out_c, lse_c, n, H, D);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
