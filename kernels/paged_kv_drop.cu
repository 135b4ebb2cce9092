// Dropping a span of slots on the GPU (spec: kernels/paged_kv_drop.h): one CTA per (row, KV
// head), its threads over the channels of one moved slot at a time, the slots in order (a barrier
// between them), so a move never reads a row that an earlier move of the same head wrote over
// unless the reference does too.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
    drop_span_kernel(PagedKv c, int D, int count, int keep) {
  const long head = blockIdx.x;  // i · Hkv + h
  const int first = c.lengths[head] - keep - count;
  for (int j = 0; j < keep; ++j) {
    kernels::MoveSlot(c, static_cast<float*>(nullptr), kernels::SlotRow(c, head, first + j),
                      kernels::SlotRow(c, head, first + count + j), D, threadIdx.x, blockDim.x);
    __syncthreads();
  }
  __syncthreads();  // every thread has read the old length
  if (threadIdx.x == 0) c.lengths[head] = first + keep;
}

}  // namespace

void paged_kv_drop_span(const PagedKv& cache, int n, int Hkv, int D, int count, int keep,
                        cudaStream_t stream) {
  if (n <= 0 || count <= 0) return;
  drop_span_kernel<<<n * Hkv, kThreads, 0, stream>>>(cache, D, count, keep);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
