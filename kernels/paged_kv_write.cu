// Paged KV cache writes on the GPU (spec: kernels/paged_kv_write.h).
// append:  one CTA of D/2 threads per (row, KV head); thread c owns the RoPE pair (c, c + D/2),
//          so the ring mean, the rotation and the stores of a channel pair stay in registers.
//          Thread 0 decides append or merge and the slot; the others wait for it in shared memory.
// extend:  one such CTA per KV head of the row walks the chunk's tokens in order (each token's
//          slot depends on the previous one's), appending each as append does.
// prefill: (1) one CTA per KV head scans the append flags over the prompt (CUB block scan) into
//          each token's slot index and the head's length; (2) one CTA per (token, KV head) whose
//          slot is final there writes it; (3) the ring entries of the open slot.
#include <cub/block/block_scan.cuh>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kScanThreads = 256;
constexpr int kSlotScratch = 11;  // detail::scratch slot: the prefill's slot index per token

// Thread c < D/2: rotates the pair (key[c], key[c + D/2]) at pos (as kernels/rope.cu) and stores
// it with the value pair in slot `row` of the pools.
__device__ __forceinline__ void store_pair(const PagedKv& c, long row, int D, int ch, float k1,
                                           float k2, float v1, float v2, int pos, float theta,
                                           bool keep_last) {
  const int half = D / 2;
  const float inv_freq = powf(theta, -2.0f * ch / D);
  float s, co;
  sincosf(static_cast<float>(pos) * inv_freq, &s, &co);
  const bool ctrl = keep_last && ch == half - 1;
  const float k2r = ctrl ? 0.f : k2;
  c.k_pool[row * D + ch] = tobf(k1 * co - k2r * s);
  c.k_pool[row * D + ch + half] = ctrl ? tobf(k2) : tobf(k2r * co + k1 * s);
  c.v_pool[row * D + ch] = tobf(v1);
  c.v_pool[row * D + ch + half] = tobf(v2);
}

// Appends or merges one token (kt, vt, its merge decision at *merge_h, null: append; its omega)
// at pos into head `head`, as kernels::paged_kv_append: one CTA of D/2 threads, thread c the
// channel pair (c, c + D/2); slot_s and count_s are the CTA's shared words. Returns the pool row
// written.
__device__ __forceinline__ long append_token(const PagedKv& c, long head, const bf16* kt,
                                             const bf16* vt, const float* merge_h, float omega,
                                             int pos, int D, float theta, bool keep_last,
                                             int& slot_s, int& count_s) {
  const int w = c.window_size, half = D / 2, ch = threadIdx.x;
  if (threadIdx.x == 0) {
    int len = c.lengths[head];
    const bool m = merge_h && len > 0 && pos > 0 && *merge_h > 0.5f;
    int count = w > 0 ? c.window_count[head] : 0;
    if (!m) {
      c.lengths[head] = ++len;
      count = 0;
    }
    if (w > 0) c.window_count[head] = count = min(count + 1, w);
    slot_s = len - 1;
    count_s = count;
  }
  __syncthreads();
  const long row = kernels::SlotRow(c, head, slot_s);
  float k1 = bf(kt[ch]), k2 = bf(kt[ch + half]), v1 = bf(vt[ch]), v2 = bf(vt[ch + half]);
  if (w > 0) {
    const long entry = 2L * D + 1;
    float* ring = c.window + head * w * entry;
    float* e = ring + (pos % w) * entry;
    e[ch] = k1;
    e[ch + half] = k2;
    e[D + ch] = v1;
    e[D + ch + half] = v2;
    if (ch == 0) e[2 * D] = omega;
    __syncthreads();  // the omega of this token
    float denom = 0.f, sk1 = 0.f, sk2 = 0.f, sv1 = 0.f, sv2 = 0.f;
    for (int p = pos - count_s + 1; p <= pos; ++p) {  // oldest first, as the reference
      const float* r = ring + (p % w) * entry;
      const float om = r[2 * D];
      denom += om;
      sk1 = fmaf(om, r[ch], sk1);
      sk2 = fmaf(om, r[ch + half], sk2);
      sv1 = fmaf(om, r[D + ch], sv1);
      sv2 = fmaf(om, r[D + ch + half], sv2);
    }
    const float inv = 1.f / denom;
    k1 = sk1 * inv;
    k2 = sk2 * inv;
    v1 = sv1 * inv;
    v2 = sv2 * inv;
  }
  store_pair(c, row, D, ch, k1, k2, v1, v2, pos, theta, keep_last);
  if (ch == 0 && c.slot_pos) c.slot_pos[row] = pos;
  return row;
}

__global__ void append_kernel(PagedKv c, const bf16* k, const bf16* v, const float* merge,
                              const float* omega, const int32_t* positions, int Hkv, int D,
                              float theta, bool keep_last) {
  const long head = blockIdx.x;  // i · Hkv + h
  __shared__ int slot_s, count_s;
  append_token(c, head, k + head * D, v + head * D, merge ? merge + head : nullptr,
               omega ? omega[head] : 1.f, positions[head / Hkv], D, theta, keep_last, slot_s,
               count_s);
}

// One CTA of D/2 threads per KV head of the row: the chunk's tokens in order, each written as
// append_kernel writes it, then read back (this thread's channels) into khat and vhat.
__global__ void extend_kernel(PagedKv c, int row, const bf16* k, const bf16* v, const float* merge,
                              const float* omega, int start, int n, int Hkv, int D, float theta,
                              bool keep_last, bf16* khat, bf16* vhat, int* prefix) {
  const int h = blockIdx.x, half = D / 2, ch = threadIdx.x;
  const long head = static_cast<long>(row) * Hkv + h;
  __shared__ int slot_s, count_s;
  const int before = c.lengths[head];
  const bool merges = merge && before > 0 && start > 0 && merge[h] > 0.5f;
  for (int t = threadIdx.x; t < n; t += blockDim.x) prefix[t * Hkv + h] = before - (merges ? 1 : 0);
  __syncthreads();  // every thread has read the length before the first token changes it
  for (int t = 0; t < n; ++t) {
    const long g = static_cast<long>(t) * Hkv + h, src = g * D;
    const long r = append_token(c, head, k + src, v + src, merge ? merge + g : nullptr,
                                omega ? omega[g] : 1.f, start + t, D, theta, keep_last, slot_s,
                                count_s);
    khat[src + ch] = c.k_pool[r * D + ch];
    khat[src + ch + half] = c.k_pool[r * D + ch + half];
    vhat[src + ch] = c.v_pool[r * D + ch];
    vhat[src + ch + half] = c.v_pool[r * D + ch + half];
    __syncthreads();  // the next token rewrites slot_s, count_s and a ring entry
  }
}

__device__ __forceinline__ bool appends(const float* merge, int t, int Hkv, int h) {
  return t == 0 || merge == nullptr || merge[static_cast<long>(t) * Hkv + h] <= 0.5f;
}

// slot[t, h] = appends in [0, t] − 1; lengths and window_count of the row; one CTA per head.
__global__ void prefill_scan_kernel(PagedKv c, int row, int32_t* slot, const float* merge, int P,
                                    int Hkv) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int last_append_s;
  const int h = blockIdx.x;
  if (threadIdx.x == 0) last_append_s = 0;
  __syncthreads();
  int running = 0;
  for (int base = 0; base < P; base += kScanThreads) {
    const int t = base + threadIdx.x;
    const int a = t < P && appends(merge, t, Hkv, h) ? 1 : 0;
    int inclusive, total;
    Scan(tmp).InclusiveSum(a, inclusive, total);
    if (t < P) slot[static_cast<long>(t) * Hkv + h] = running + inclusive - 1;
    if (a) atomicMax(&last_append_s, t);
    running += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const long head = static_cast<long>(row) * Hkv + h;
    c.lengths[head] = running;
    if (c.window_size > 0) c.window_count[head] = min(P - last_append_s, c.window_size);
  }
}

// One CTA of D/2 threads per (t, h): writes slot[t, h] when it is final at t.
__global__ void prefill_slots_kernel(PagedKv c, int row, const int32_t* slot, const bf16* khat,
                                     const bf16* vhat, const float* merge, int P, int Hkv, int D,
                                     float theta, bool keep_last) {
  const int t = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  if (t + 1 < P && !appends(merge, t + 1, Hkv, h)) return;
  const long head = static_cast<long>(row) * Hkv + h;
  const long src = (static_cast<long>(t) * Hkv + h) * D;
  const int ch = threadIdx.x, half = D / 2;
  const long r = kernels::SlotRow(c, head, slot[static_cast<long>(t) * Hkv + h]);
  store_pair(c, r, D, ch, bf(khat[src + ch]), bf(khat[src + ch + half]), bf(vhat[src + ch]),
             bf(vhat[src + ch + half]), t, theta, keep_last);
  if (ch == 0 && c.slot_pos) c.slot_pos[r] = t;
}

// One CTA per (ring entry e < w, h): the raw token of position P − 1 − e if the open slot holds it.
__global__ void prefill_window_kernel(PagedKv c, int row, const bf16* k, const bf16* v,
                                      const float* omega, int P, int Hkv, int D) {
  const int w = c.window_size;
  const int e = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  const long head = static_cast<long>(row) * Hkv + h;
  const int p = P - 1 - e;
  if (e >= c.window_count[head]) return;
  float* dst = c.window + (head * w + p % w) * (2L * D + 1);
  const long src = (static_cast<long>(p) * Hkv + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    dst[d] = bf(k[src + d]);
    dst[D + d] = bf(v[src + d]);
  }
  if (threadIdx.x == 0) dst[2 * D] = omega ? omega[static_cast<long>(p) * Hkv + h] : 1.f;
}

__global__ void assign_pages_kernel(int32_t* page_table, const int64_t* index, const int32_t* page,
                                    int n) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < n) page_table[index[j]] = page[j];
}

}  // namespace

void paged_kv_assign_pages(int32_t* page_table, const int64_t* index, const int32_t* page, int n,
                           cudaStream_t stream) {
  if (n <= 0) return;
  assign_pages_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(page_table, index, page, n);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_append(const PagedKv& cache, const bf16* k, const bf16* v, const float* merge,
                     const float* omega, const int32_t* positions, int n, int Hkv, int D,
                     float theta, bool keep_last_channel, cudaStream_t stream) {
  if (n <= 0) return;
  append_kernel<<<n * Hkv, D / 2, 0, stream>>>(cache, k, v, merge, omega, positions, Hkv, D,
                                                theta, keep_last_channel);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_extend(const PagedKv& cache, int row, const bf16* k, const bf16* v,
                     const float* merge, const float* omega, int start, int n, int Hkv, int D,
                     float theta, bool keep_last_channel, bf16* khat, bf16* vhat, int* prefix,
                     cudaStream_t stream) {
  if (n <= 0) return;
  extend_kernel<<<Hkv, D / 2, 0, stream>>>(cache, row, k, v, merge, omega, start, n, Hkv, D, theta,
                                           keep_last_channel, khat, vhat, prefix);
  DMC_CUDA_CHECK_LAUNCH();
}

void paged_kv_prefill(const PagedKv& cache, int row, const bf16* khat, const bf16* vhat,
                      const bf16* k, const bf16* v, const float* merge, const float* omega, int P,
                      int Hkv, int D, float theta, bool keep_last_channel, cudaStream_t stream) {
  if (P <= 0) return;
  auto* slot = static_cast<int32_t*>(scratch(kSlotScratch, sizeof(int32_t) * P * Hkv));
  prefill_scan_kernel<<<Hkv, kScanThreads, 0, stream>>>(cache, row, slot, merge, P, Hkv);
  DMC_CUDA_CHECK_LAUNCH();
  prefill_slots_kernel<<<P * Hkv, D / 2, 0, stream>>>(cache, row, slot, khat, vhat, merge, P, Hkv,
                                                      D, theta, keep_last_channel);
  DMC_CUDA_CHECK_LAUNCH();
  if (cache.window_size > 0) {
    prefill_window_kernel<<<cache.window_size * Hkv, 128, 0, stream>>>(cache, row, k, v, omega, P,
                                                                       Hkv, D);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dmc::cuda
