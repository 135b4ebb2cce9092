// The page bookkeeping on the GPU (spec: kernels/paged_kv_pages.h).
// page_changes: one CTA per row walks that row's L · Hkv heads; a head that changes takes an
//   entry by one atomic on the count (few heads change in a step: a DMC head at CR 8 needs a page
//   about once in 16 steps), and the row's slots are summed by a block reduction. The entries
//   may be host memory mapped into the device's address space, so the host reads them after the
//   stream's synchronisation without another copy.
#include <cub/block/block_reduce.cuh>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 256;

__global__ void page_changes_kernel(kernels::PagedKvPages p, int row0, int tokens,
                                    kernels::PageChange* changes, int32_t* count,
                                    int32_t* row_slots) {
  const int row = row0 + blockIdx.x;
  const bool quant = p.q_lengths != nullptr;
  int32_t slots = 0;
  for (int j = threadIdx.x; j < p.L * p.Hkv; j += blockDim.x) {
    const int l = j / p.Hkv, h = j % p.Hkv;
    const int head = (l * p.R + row) * p.Hkv + h;
    const int residual = p.lengths[head], quantized = quant ? p.q_lengths[head] : 0;
    slots += residual + quantized;
    const bool writes = p.writes == nullptr || p.writes[l];
    const int keep = writes ? kernels::KvPagesKept(residual, quantized, p.page_size, quant) : 0;
    const int grow =
        writes ? kernels::KvPagesToGrow(residual, quantized, tokens, p.page_size, quant) : 0;
    const int held = p.held[head];
    if (held > keep || grow > keep) {
      changes[atomicAdd(count, 1)] = {head, max(0, held - keep), max(0, grow - keep)};
      p.held[head] = keep;
    }
  }
  using Reduce = cub::BlockReduce<int32_t, kThreads>;
  __shared__ typename Reduce::TempStorage scratch;
  const int32_t total = Reduce(scratch).Sum(slots);
  if (threadIdx.x == 0) row_slots[blockIdx.x] = total;
}

__global__ void assign_pages_kernel(int32_t* page_table, int32_t* held, const int64_t* index,
                                    const int32_t* page, int n, int max_pages) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  page_table[index[j]] = page[j];
  atomicMax(&held[index[j] / max_pages], static_cast<int32_t>(index[j] % max_pages) + 1);
}

}  // namespace

void paged_kv_page_changes(const kernels::PagedKvPages& pages, int row0, int n, int tokens,
                           kernels::PageChange* changes, int32_t* count, int32_t* row_slots,
                           cudaStream_t stream) {
  DMC_CUDA_CHECK(cudaMemsetAsync(count, 0, sizeof(int32_t), stream));
  if (n <= 0) return;
  page_changes_kernel<<<n, kThreads, 0, stream>>>(pages, row0, tokens, changes, count, row_slots);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_assign_pages(int32_t* page_table, int32_t* held, const int64_t* index,
                           const int32_t* page, int n, int max_pages, cudaStream_t stream) {
  if (n <= 0) return;
  assign_pages_kernel<<<ceil_div(n, kThreads), kThreads, 0, stream>>>(page_table, held, index,
                                                                      page, n, max_pages);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
