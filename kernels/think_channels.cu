// ThinK on the GPU (spec: kernels/think_channels.h): the query energy each KV head accumulates at
// every step, and the pages its full-precision residual closes, pruned to their kept key channels.
//
// think_observe_queries: a thread per (row, KV head, channel) adds its group's squares in query
// head order, a multiply then an add in fp32 (no fused multiply-add), as the CPU reference does.
// think_prune_pages: one CTA per entry (an entry of negative page id returns at once), a thread
// per channel: score_j in fp64 over the page's rows in row order, times the head's energy (the
// CPU's double arithmetic on the same values, so the same scores); a channel is kept when fewer
// than `kept` channels outrank it (a higher score, or the same at a lower channel: the reference's
// stable sort); its place in a pruned row counts the kept channels below it. Then the mask, the
// pruned keys and the values, and the head's energy is reset. A page closes once per page_size
// tokens of a head, so plain loops serve.
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 128;
constexpr int kMaxDim = 128;

__global__ void observe_queries_kernel(float* energy, const bf16* q, int n, int H, int Hkv, int D,
                                       bool exclude_ctrl) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(n) * Hkv * D) return;
  const int j = static_cast<int>(i % D);
  if (exclude_ctrl && j == D - 1) return;
  const long head = i / D;  // row · Hkv + KV head
  const int G = H / Hkv;
  const long row = head / Hkv, h = head - row * Hkv;
  const bf16* qg = q + (row * H + h * G) * D + j;
  float e = energy[i];
  for (int g = 0; g < G; ++g) {
    const float x = bf(qg[static_cast<long>(g) * D]);
    e = __fadd_rn(e, __fmul_rn(x, x));
  }
  energy[i] = e;
}

__global__ void __launch_bounds__(kThreads)
    prune_page_kernel(bf16* k_pages, bf16* v_pages, uint8_t* masks, float* energy,
                      const int32_t* page_ids, const bf16* k_rows, const bf16* v_rows,
                      const int32_t* rows, int P, int D, int kept) {
  __shared__ double score[kMaxDim];
  __shared__ bool keep[kMaxDim];
  __shared__ int place[kMaxDim];  // a kept channel's index in the pruned row
  const long page = page_ids[blockIdx.x];
  if (page < 0) return;  // this entry's head closes no page
  const int32_t* page_rows = rows + static_cast<long>(blockIdx.x) * P;
  float* head_energy = energy + static_cast<long>(blockIdx.x) * D;
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    double sum = 0;
    for (int r = 0; r < P; ++r) {
      const double x = bf(k_rows[static_cast<long>(page_rows[r]) * D + j]);
      sum += x * x;
    }
    score[j] = sum * static_cast<double>(head_energy[j]);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    int rank = 0;
    for (int o = 0; o < D; ++o) rank += score[o] > score[j] || (score[o] == score[j] && o < j);
    keep[j] = rank < kept;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    int below = 0;
    for (int o = 0; o < j; ++o) below += keep[o];
    place[j] = below;
  }
  __syncthreads();
  const int mask_bytes = kernels::ThinkMaskBytes(D);
  for (int b = threadIdx.x; b < mask_bytes; b += blockDim.x) {
    int byte = 0;
    for (int c = 0; c < 8 && 8 * b + c < D; ++c) byte |= keep[8 * b + c] << c;
    masks[page * mask_bytes + b] = static_cast<uint8_t>(byte);
  }
  for (int i = threadIdx.x; i < P * D; i += blockDim.x) {
    const int r = i / D, j = i - r * D;
    const long from = static_cast<long>(page_rows[r]) * D + j;
    const long to = page * P + r;
    if (keep[j]) k_pages[to * kept + place[j]] = k_rows[from];
    v_pages[to * D + j] = v_rows[from];
  }
  for (int j = threadIdx.x; j < D; j += blockDim.x) head_energy[j] = 0.f;
}

[[noreturn]] void fail(const char* op, const char* what) {
  std::fprintf(stderr, "%s: %s\n", op, what);
  std::abort();
}

}  // namespace

void think_observe_queries(float* energy, const bf16* q, int n, int H, int Hkv, int D,
                           bool exclude_ctrl, cudaStream_t stream) {
  if (n <= 0) return;
  if (Hkv <= 0 || H % Hkv != 0 || D <= 0)
    fail("think_observe_queries", "H must be a multiple of Hkv, D positive");
  const long threads = static_cast<long>(n) * Hkv * D;
  observe_queries_kernel<<<static_cast<unsigned>((threads + kThreads - 1) / kThreads), kThreads, 0,
                           stream>>>(energy, q, n, H, Hkv, D, exclude_ctrl);
  DMC_CUDA_CHECK_LAUNCH();
}

void think_prune_pages(bf16* k_pages, bf16* v_pages, uint8_t* masks, float* energy,
                       const int32_t* page_ids, const bf16* k_rows, const bf16* v_rows,
                       const int32_t* rows, int n, int page_size, int D, int kept,
                       cudaStream_t stream) {
  if (n <= 0) return;
  if (D <= 0 || D > kMaxDim) fail("think_prune_pages", "head dim must be 1 to 128");
  if (kept < 1 || kept > D) fail("think_prune_pages", "kept channels must be 1 to D");
  if (page_size <= 0) fail("think_prune_pages", "page_size must be positive");
  prune_page_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      k_pages, v_pages, masks, energy, page_ids, k_rows, v_rows, rows, page_size, D, kept);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
