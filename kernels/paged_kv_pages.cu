// The page bookkeeping on the GPU (spec: kernels/paged_kv_pages.h).
// page_changes: one CTA per row walks that row's L · Hkv heads, kThreads at a time; a block scan
//   of the changing heads' flags places each entry in the row's list in head order (the host
//   then hands out pages in the same order on every run), and block reductions sum the row's
//   slots and spare pages. Few heads change in a step (a DMC head at CR 8 fills a page about
//   once in 128 tokens).
//   The lists may be host memory mapped into the device's address space, so the host reads them
//   after the stream's synchronisation without another copy.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 256;

__global__ void page_changes_kernel(kernels::PagedKvPages p, int row0, int tokens,
                                    kernels::PageChange* changes, int32_t* counts,
                                    int32_t* row_slots, int32_t* row_spare) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  using Reduce = cub::BlockReduce<int32_t, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } scratch;
  const int row = row0 + blockIdx.x, heads = p.L * p.Hkv;
  const bool quant = p.q_lengths != nullptr;
  kernels::PageChange* list = changes + static_cast<long>(blockIdx.x) * heads;
  int32_t slots = 0, spare = 0, count = 0;
  for (int base = 0; base < heads; base += kThreads) {
    const int i = base + threadIdx.x;
    kernels::PageChange change{i, 0, 0};
    int32_t changes_here = 0;
    long head = 0;
    if (i < heads) {
      const int l = i / p.Hkv;
      head = (static_cast<long>(l) * p.R + row) * p.Hkv + i % p.Hkv;
      const int residual = p.lengths[head], quantized = quant ? p.q_lengths[head] : 0;
      slots += residual + quantized;
      const int keep = kernels::KvHeadPagesKept(p, l, residual, quantized);
      const int grow = kernels::KvHeadPagesToGrow(p, l, residual, quantized, tokens);
      const int held = p.held[head];
      spare += grow - keep;
      changes_here = held != grow;
      change = {i, max(0, held - grow), max(0, grow - held)};
      if (changes_here) p.held[head] = min(held, grow);
    }
    int32_t at, total;
    Scan(scratch.scan).ExclusiveSum(changes_here, at, total);
    if (changes_here) list[count + at] = change;
    count += total;
    __syncthreads();  // the scan's storage is reused by the next round
  }
  const int32_t total = Reduce(scratch.reduce).Sum(slots);
  __syncthreads();  // the reduction's storage is reused by the next
  const int32_t spare_total = Reduce(scratch.reduce).Sum(spare);
  if (threadIdx.x == 0) {
    counts[blockIdx.x] = count;
    row_slots[blockIdx.x] = total;
    row_spare[blockIdx.x] = spare_total;
  }
}

__global__ void assign_pages_kernel(int32_t* page_table, int32_t* held, const int64_t* index,
                                    const int32_t* page, int n, int max_pages) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  page_table[index[j]] = page[j];
  atomicMax(&held[index[j] / max_pages], static_cast<int32_t>(index[j] % max_pages) + 1);
}

// One thread per head of the padding rows: (layer, head within the rows) = (blockIdx.y, j).
__global__ void clear_rows_kernel(int32_t* page_table, int32_t* lengths, int32_t* q_lengths,
                                  int32_t* window_count, int32_t sink, int R, int Hkv,
                                  int max_pages, int row0, int n) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n * Hkv) return;
  const long head = (static_cast<long>(blockIdx.y) * R + row0) * Hkv + j;
  lengths[head] = 0;
  if (q_lengths != nullptr) q_lengths[head] = 0;
  window_count[head] = 0;
  page_table[head * max_pages] = sink;
}

}  // namespace

void paged_kv_page_changes(const kernels::PagedKvPages& pages, int row0, int n, int tokens,
                           kernels::PageChange* changes, int32_t* counts, int32_t* row_slots,
                           int32_t* row_spare, cudaStream_t stream) {
  if (n <= 0) return;
  page_changes_kernel<<<n, kThreads, 0, stream>>>(pages, row0, tokens, changes, counts, row_slots,
                                                  row_spare);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_assign_pages(int32_t* page_table, int32_t* held, const int64_t* index,
                           const int32_t* page, int n, int max_pages, cudaStream_t stream) {
  if (n <= 0) return;
  assign_pages_kernel<<<ceil_div(n, kThreads), kThreads, 0, stream>>>(page_table, held, index,
                                                                      page, n, max_pages);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_clear_rows(int32_t* page_table, int32_t* lengths, int32_t* q_lengths,
                         int32_t* window_count, int32_t sink, int L, int R, int Hkv,
                         int max_pages, int row0, int n, cudaStream_t stream) {
  if (n <= 0 || L <= 0) return;
  const dim3 grid(ceil_div(static_cast<long>(n) * Hkv, kThreads), L);
  clear_rows_kernel<<<grid, kThreads, 0, stream>>>(page_table, lengths, q_lengths, window_count,
                                                   sink, R, Hkv, max_pages, row0, n);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
