// Which slots of a quantized paged KV cache close into pages, on the GPU (spec:
// kernels/paged_kv_settle.h).
// step:    one thread per (row, KV head); a closing head writes its page_size row indices.
// prefill: one CTA per KV head of the row: its threads fill the head's page list and copy its
//          residual rows from the staging pool, all having read S before thread 0 rewrites the
//          lengths.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using kernels::KvSettleLayer;

constexpr int kThreads = 128;

__global__ void settle_step_kernel(int32_t* page_ids, int32_t* rows, KvSettleLayer c,
                                   const float* merge, const int32_t* positions, int n, int Hkv) {
  const long head = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (head >= static_cast<long>(n) * Hkv) return;
  const int P = c.page_size, r = c.r_lengths[head];
  const bool merges = merge && r > 0 && positions[head / Hkv] > 0 && merge[head] > 0.5f;
  page_ids[head] = -1;
  if (merges || r != P) return;
  page_ids[head] = c.page_table[head * c.max_pages + c.q_lengths[head] / P];
  for (int j = 0; j < P; ++j) rows[head * P + j] = static_cast<int32_t>(head * c.residual_slots + j);
  c.q_lengths[head] += P;
  c.r_lengths[head] = 0;
}

__global__ void __launch_bounds__(kThreads)
    settle_prefill_kernel(int32_t* page_ids, int32_t* rows, int max_closed, KvSettleLayer c,
                          bf16* r_k, bf16* r_v, const bf16* stage_k, const bf16* stage_v,
                          int stage_stride, int row, int Hkv, int D) {
  const int h = blockIdx.x, P = c.page_size;
  const long head = static_cast<long>(row) * Hkv + h;
  const int S = c.r_lengths[head], closed = max(0, S - 1) / P, C = closed * P;
  for (int m = threadIdx.x; m < max_closed; m += blockDim.x)
    page_ids[static_cast<long>(h) * max_closed + m] =
        m < closed ? c.page_table[head * c.max_pages + m] : -1;
  for (long i = threadIdx.x; i < static_cast<long>(C); i += blockDim.x) {
    const long m = i / P;  // entry h·max_closed + m, row i − m·P
    rows[(static_cast<long>(h) * max_closed + m) * P + (i - m * P)] =
        static_cast<int32_t>(static_cast<long>(h) * stage_stride + i);
  }
  const long from = (static_cast<long>(h) * stage_stride + C) * D;
  const long to = head * c.residual_slots * D;
  for (long i = threadIdx.x; i < static_cast<long>(S - C) * D; i += blockDim.x) {
    r_k[to + i] = stage_k[from + i];
    r_v[to + i] = stage_v[from + i];
  }
  __syncthreads();  // every thread has read S
  if (threadIdx.x == 0) {
    c.q_lengths[head] = C;
    c.r_lengths[head] = S - C;
  }
}

}  // namespace

void paged_kv_settle_step(int32_t* page_ids, int32_t* rows, const KvSettleLayer& layer,
                          const float* merge, const int32_t* positions, int n, int Hkv,
                          cudaStream_t stream) {
  if (n <= 0) return;
  settle_step_kernel<<<ceil_div(static_cast<long>(n) * Hkv, kThreads), kThreads, 0, stream>>>(
      page_ids, rows, layer, merge, positions, n, Hkv);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_settle_prefill(int32_t* page_ids, int32_t* rows, int max_closed,
                             const KvSettleLayer& layer, bf16* r_k, bf16* r_v,
                             const bf16* stage_k, const bf16* stage_v, int stage_stride, int row,
                             int Hkv, int D, cudaStream_t stream) {
  settle_prefill_kernel<<<Hkv, kThreads, 0, stream>>>(page_ids, rows, max_closed, layer, r_k, r_v,
                                                      stage_k, stage_v, stage_stride, row, Hkv, D);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
