// Which slots of a quantized paged KV cache close into pages, on the GPU (spec:
// kernels/paged_kv_settle.h).
// step:    one thread per (row, KV head); a closing head writes its page_size row indices
//          (ZipCache: row j goes to page row rank(j), the slots of higher saliency, or equal
//          saliency and older, before it: the reference's stable sort), a settling slot its one.
// lagged:  one CTA per (row, KV head): its threads gather the settled slots' positions and
//          indices into shared memory (a shared counter hands out places, in any order); where
//          page_size have settled, each settled slot's page row is its rank by position among
//          the settled ones (positions are distinct, so the gathering order does not matter):
//          settled² comparisons, page_size² when a page closes (a step settles at most one more
//          slot), where ranking among all r residual slots took r · page_size, DMS's window
//          being in the residual. Then each thread takes channels and walks the residual in
//          order, copying a closing row to the stage and moving a kept one up (a column per
//          thread, rows in increasing order: no row is written before it is read), and thread 0
//          moves the positions and marks the same way.
// prefill: one CTA per KV head of the row: its threads count the settled slots (settle lag > 0),
//          fill the head's page (or, a slot at a time, row) list and copy its residual rows from
//          the staging pool, all having read S before thread 0 rewrites the lengths.
// scores:  one thread per (row, KV head, residual slot).
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using kernels::KvSettleLayer;

constexpr int kThreads = 128;

__global__ void settle_step_kernel(int32_t* page_ids, int32_t* page_rows, int32_t* rows,
                                   KvSettleLayer c, const float* merge, const int32_t* positions,
                                   int n, int Hkv) {
  const long head = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (head >= static_cast<long>(n) * Hkv) return;
  const int P = c.page_size, r = c.r_lengths[head];
  const bool merges = merge && r > 0 && positions[head / Hkv] > 0 && merge[head] > 0.5f;
  page_ids[head] = -1;
  if (merges || r != (c.slots_settle ? 1 : P)) return;
  if (c.slots_settle) {  // the residual's one slot into the next row of the last page
    KvSettleSlot(c, head, page_ids, page_rows, rows);
    return;
  }
  page_ids[head] = c.page_table[head * c.max_pages + c.q_lengths[head] / P];
  const float* score = c.r_scores ? c.r_scores + head * c.residual_slots : nullptr;
  for (int j = 0; j < P; ++j) {
    int rank = j;
    if (score) {
      const double saliency = static_cast<double>(score[j]) / (P - j);
      rank = 0;
      for (int k = 0; k < P; ++k) {
        const double other = static_cast<double>(score[k]) / (P - k);
        rank += other > saliency || (other == saliency && k < j);
      }
    }
    rows[head * P + rank] = static_cast<int32_t>(head * c.residual_slots + j);
  }
  c.q_lengths[head] += P;
  c.r_lengths[head] = 0;
}

// Dynamic shared memory, three arrays of `stride` ints: the page row of each residual slot (−1:
// it stays), then the settled slots' positions and their residual indices.
__global__ void __launch_bounds__(kThreads)
    settle_lagged_kernel(int32_t* page_ids, int32_t* rows, bf16* stage_k, bf16* stage_v,
                         KvSettleLayer c, bf16* r_k, bf16* r_v, const int32_t* positions, int Hkv,
                         int D, int stride) {
  extern __shared__ int lagged_smem[];
  int* page_row = lagged_smem;
  int* settled_pos = lagged_smem + stride;
  int* settled_slot = lagged_smem + 2 * stride;
  __shared__ int settled;
  const long head = blockIdx.x;  // i · Hkv + h
  const int P = c.page_size, r = c.r_lengths[head], cut = positions[head / Hkv] - c.settle_lag;
  int32_t* pos = c.r_pos + head * c.residual_slots;
  if (threadIdx.x == 0) settled = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < r; j += blockDim.x) {
    page_row[j] = -1;
    if (pos[j] < cut) {
      const int at = atomicAdd(&settled, 1);
      settled_pos[at] = pos[j];
      settled_slot[at] = j;
    }
  }
  __syncthreads();
  if (settled < P) {
    if (threadIdx.x == 0) page_ids[head] = -1;
    return;
  }
  for (int i = threadIdx.x; i < settled; i += blockDim.x) {
    int rank = 0;
    for (int k = 0; k < settled; ++k) rank += settled_pos[k] < settled_pos[i];
    if (rank < P) page_row[settled_slot[i]] = rank;
  }
  __syncthreads();
  bf16* k = r_k + head * c.residual_slots * D;
  bf16* v = r_v + head * c.residual_slots * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    for (int j = 0, kept = 0; j < r; ++j) {
      const long from = static_cast<long>(j) * D + d;
      if (page_row[j] >= 0) {
        const long to = (head * P + page_row[j]) * D + d;
        stage_k[to] = k[from];
        stage_v[to] = v[from];
      } else {
        k[static_cast<long>(kept) * D + d] = k[from];
        v[static_cast<long>(kept) * D + d] = v[from];
        ++kept;
      }
    }
  if (threadIdx.x != 0) return;
  uint8_t* marks = c.r_marks + head * c.residual_slots;
  int kept = 0;
  for (int j = 0; j < r; ++j) {
    if (page_row[j] >= 0) continue;
    pos[kept] = pos[j];
    marks[kept] = marks[j];
    ++kept;
  }
  for (int x = 0; x < P; ++x) rows[head * P + x] = static_cast<int32_t>(head * P + x);
  page_ids[head] = c.page_table[head * c.max_pages + c.q_lengths[head] / P];
  c.q_lengths[head] += P;
  c.r_lengths[head] = kept;  // only thread 0 reads r after the barriers above
}

__global__ void __launch_bounds__(kThreads)
    settle_prefill_kernel(int32_t* page_ids, int32_t* page_rows, int32_t* rows, int max_closed,
                          KvSettleLayer c, bf16* r_k, bf16* r_v, const bf16* stage_k,
                          const bf16* stage_v,
                          const int32_t* stage_pos, const uint8_t* stage_marks, int stage_stride,
                          int row, int tokens, int Hkv, int D) {
  __shared__ int settled_s;
  const int h = blockIdx.x, P = c.page_size;
  const long head = static_cast<long>(row) * Hkv + h, first = static_cast<long>(h) * stage_stride;
  const int S = c.r_lengths[head];
  if (threadIdx.x == 0) settled_s = c.settle_lag > 0 ? 0 : max(0, S - 1);
  __syncthreads();
  for (int s = threadIdx.x; c.settle_lag > 0 && s < S; s += blockDim.x)
    if (stage_pos[first + s] < tokens - 1 - c.settle_lag) atomicAdd(&settled_s, 1);
  __syncthreads();
  const int closed = settled_s / P, C = c.slots_settle ? settled_s : closed * P;
  for (int i = threadIdx.x; c.slots_settle && i < max_closed * P; i += blockDim.x) {
    const long j = static_cast<long>(h) * max_closed * P + i;  // every settled slot, its row
    page_ids[j] = i < C ? c.page_table[head * c.max_pages + i / P] : -1;
    page_rows[j] = i % P;
    rows[j] = static_cast<int32_t>(first + i);
  }
  for (int m = threadIdx.x; !c.slots_settle && m < max_closed; m += blockDim.x)
    page_ids[static_cast<long>(h) * max_closed + m] =
        m < closed ? c.page_table[head * c.max_pages + m] : -1;
  for (long i = threadIdx.x; !c.slots_settle && i < static_cast<long>(C); i += blockDim.x) {
    const long m = i / P;  // entry h·max_closed + m, row i − m·P
    rows[(static_cast<long>(h) * max_closed + m) * P + (i - m * P)] =
        static_cast<int32_t>(static_cast<long>(h) * stage_stride + i);
  }
  const long from = (first + C) * D;
  const long to = head * c.residual_slots * D;
  for (long i = threadIdx.x; i < static_cast<long>(S - C) * D; i += blockDim.x) {
    r_k[to + i] = stage_k[from + i];
    r_v[to + i] = stage_v[from + i];
  }
  for (int s = threadIdx.x; c.settle_lag > 0 && s < S - C; s += blockDim.x) {
    c.r_pos[head * c.residual_slots + s] = stage_pos[first + C + s];
    c.r_marks[head * c.residual_slots + s] = stage_marks[first + C + s];
  }
  __syncthreads();  // every thread has read S
  if (threadIdx.x == 0) {
    c.q_lengths[head] = C;
    c.r_lengths[head] = S - C;
  }
}

__global__ void settle_scores_kernel(KvSettleLayer c, const float* probs, int probs_stride,
                                     long n_slots, int H, int Hkv) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_slots) return;
  const long head = i / c.residual_slots, row = head / Hkv, h = head % Hkv;
  const int j = static_cast<int>(i % c.residual_slots), r = c.r_lengths[head];
  if (j >= r) return;
  const int G = H / Hkv;
  const float* p = probs + (row * H + h * G) * probs_stride + c.q_lengths[head] + j;
  float s = j == r - 1 ? 0.0f : c.r_scores[i];
  for (int g = 0; g < G; ++g) s += p[static_cast<long>(g) * probs_stride];
  c.r_scores[i] = s;
}

}  // namespace

void paged_kv_settle_step(int32_t* page_ids, int32_t* page_rows, int32_t* rows,
                          const KvSettleLayer& layer, const float* merge,
                          const int32_t* positions, int n, int Hkv, cudaStream_t stream) {
  if (n <= 0) return;
  settle_step_kernel<<<ceil_div(static_cast<long>(n) * Hkv, kThreads), kThreads, 0, stream>>>(
      page_ids, page_rows, rows, layer, merge, positions, n, Hkv);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_settle_lagged_step(int32_t* page_ids, int32_t* rows, bf16* stage_k, bf16* stage_v,
                                 const KvSettleLayer& layer, bf16* r_k, bf16* r_v,
                                 const int32_t* positions, int n, int Hkv, int D,
                                 cudaStream_t stream) {
  if (n <= 0) return;
  // Each array rounded up to whole 16-byte words: ptxas may merge the guarded reads of
  // consecutive rows into one wider load, which compute-sanitizer flags past a 36-byte array.
  const int stride = (layer.residual_slots + 3) / 4 * 4;
  const size_t smem = static_cast<size_t>(3 * stride) * sizeof(int);
  settle_lagged_kernel<<<static_cast<unsigned>(n * Hkv), kThreads, smem, stream>>>(
      page_ids, rows, stage_k, stage_v, layer, r_k, r_v, positions, Hkv, D, stride);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_settle_prefill(int32_t* page_ids, int32_t* page_rows, int32_t* rows,
                             int max_closed, const KvSettleLayer& layer, bf16* r_k, bf16* r_v,
                             const bf16* stage_k, const bf16* stage_v, const int32_t* stage_pos,
                             const uint8_t* stage_marks, int stage_stride, int row, int tokens,
                             int Hkv, int D, cudaStream_t stream) {
  settle_prefill_kernel<<<Hkv, kThreads, 0, stream>>>(page_ids, page_rows, rows, max_closed,
                                                      layer, r_k, r_v, stage_k, stage_v,
                                                      stage_pos, stage_marks, stage_stride, row,
                                                      tokens, Hkv, D);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_settle_scores(const KvSettleLayer& layer, const float* probs, int probs_stride,
                            int n, int H, int Hkv, cudaStream_t stream) {
  const long n_slots = static_cast<long>(n) * Hkv * layer.residual_slots;
  if (n_slots <= 0) return;
  settle_scores_kernel<<<ceil_div(n_slots, kThreads), kThreads, 0, stream>>>(
      layer, probs, probs_stride, n_slots, H, Hkv);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
