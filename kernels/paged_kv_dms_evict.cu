// DMS's delayed eviction on the GPU (spec: kernels/paged_kv_dms_evict.h).
// evict:   one CTA per (row, KV head): its threads walk the head's slots, each a slot, updating
//          the marks of the new and the previous token and finding the leaving one (positions are
//          distinct, so at most one thread finds it); then the CTA moves the last slot into it.
// prefill: merge' from the decisions (one thread per (position, KV head)), paged_kv_prefill, then
//          the marks of the kept slots (one thread per (slot, KV head)).
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
    evict_kernel(PagedKv c, uint8_t* marks, const float* evict, const int32_t* positions, int Hkv,
                 int D, int window) {
  const long head = blockIdx.x;  // i · Hkv + h
  const int t = positions[head / Hkv], leaving = t - window - 1;
  const bool marks_previous = t > 0 && evict[head] > 0.5f;
  const int len = c.lengths[head];
  __shared__ int leaving_s;
  if (threadIdx.x == 0) leaving_s = -1;
  __syncthreads();
  for (int s = threadIdx.x; s < len; s += blockDim.x) {
    const long r = kernels::SlotRow(c, head, s);
    const int p = c.slot_pos[r];
    uint8_t mark = marks[r];
    if (p == t) marks[r] = mark = 0;
    if (p == t - 1 && marks_previous) marks[r] = mark = 1;
    if (p == leaving && mark) leaving_s = s;
  }
  __syncthreads();
  const int victim = leaving_s, last = len - 1;
  if (victim < 0) return;
  if (victim != last)
    kernels::MoveSlot(c, marks, kernels::SlotRow(c, head, victim), kernels::SlotRow(c, head, last),
                      D, threadIdx.x, blockDim.x);
  // Every thread read the old length before the barrier above.
  if (threadIdx.x == 0) c.lengths[head] = last;
}

// merge'[s, h] = evict[s, h] for s <= P − w − 1, else 0.
__global__ void prefill_merge_kernel(float* merge, const float* evict, int P, int Hkv,
                                     int window) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(P) * Hkv) return;
  merge[i] = i / Hkv <= P - window - 1 ? evict[i] : 0.f;
}

// One thread per (slot s, KV head h) of row `row`: the mark of the token the slot holds.
__global__ void prefill_marks_kernel(PagedKv c, uint8_t* marks, int row, const float* evict,
                                     int P, int Hkv) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(P) * Hkv) return;
  const int s = static_cast<int>(i / Hkv), h = static_cast<int>(i % Hkv);
  const long head = static_cast<long>(row) * Hkv + h;
  if (s >= c.lengths[head]) return;
  const long r = kernels::SlotRow(c, head, s);
  const int t = c.slot_pos[r];
  marks[r] = t + 1 < P && evict[static_cast<long>(t + 1) * Hkv + h] > 0.5f ? 1 : 0;
}

}  // namespace

void paged_kv_dms_evict(const PagedKv& cache, uint8_t* marks, const float* evict,
                        const int32_t* positions, int n, int Hkv, int D, int window,
                        cudaStream_t stream) {
  if (n <= 0) return;
  evict_kernel<<<n * Hkv, kThreads, 0, stream>>>(cache, marks, evict, positions, Hkv, D, window);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_dms_prefill(const PagedKv& cache, uint8_t* marks, int row, const bf16* k,
                          const bf16* v, const float* evict, int P, int Hkv, int D, int window,
                          float theta, cudaStream_t stream) {
  if (P <= 0) return;
  const long total = static_cast<long>(P) * Hkv;
  auto* merge = static_cast<float*>(scratch(kScratchDmsMerge, sizeof(float) * total));
  prefill_merge_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(merge, evict, P, Hkv, window);
  DMC_CUDA_CHECK_LAUNCH();
  paged_kv_prefill(cache, row, k, v, k, v, merge, nullptr, P, Hkv, D, theta, false, stream);
  prefill_marks_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(cache, marks, row, evict, P,
                                                                 Hkv);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
