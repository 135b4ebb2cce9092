// Paged KV cache writes on the GPU (spec: kernels/paged_kv_write.h).
// append:  one CTA of D/2 threads per (row, KV head); thread c owns the RoPE pair (c, c + D/2),
//          so the ring mean, the rotation and the stores of a channel pair stay in registers.
//          Thread 0 decides append or merge and the slot; the others wait for it in shared memory.
// prefill and extend (a run of tokens of one row, the whole prompt or a chunk continuing the
//          row) in three passes, each parallel over the run's tokens:
//          (1) one CTA per KV head scans the append flags over the run (CUB block scans, a sum
//              and a max of the last append, started from the row's length and ring count for a
//              chunk, from empty for a prompt) into each token's slot index (and, for a chunk, the
//              ring count after it), the head's length and ring count after the run;
//          (2) one CTA per (token, KV head): a prompt writes the slot that is final there from
//              the scan's k̂, v̂; a chunk forms the slot as it stands after the token (the ring
//              mean over the count newest positions, those before the chunk read from the row's
//              ring) into k̂, v̂, and into the pool where it is final;
//          (3) the ring entries the run leaves: the open slot's tokens (a prompt), every token of
//              the last w (a chunk, as its appends write them).
#include <cub/block/block_scan.cuh>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kScanThreads = 256;
constexpr int kSlotScratch = 11;  // detail::scratch slot: a run's slot (and ring count) per token

// Thread c < D/2: rotates the pair (key[c], key[c + D/2]) at pos (as kernels/rope.cu) and stores
// it in k_row, the value pair in v_row (a slot's rows of the pools, or of k̂ and v̂).
__device__ __forceinline__ void store_pair(bf16* k_row, bf16* v_row, int D, int ch, float k1,
                                           float k2, float v1, float v2, int pos, float theta,
                                           bool keep_last) {
  const int half = D / 2;
  const float inv_freq = powf(theta, -2.0f * ch / D);
  float s, co;
  sincosf(static_cast<float>(pos) * inv_freq, &s, &co);
  const bool ctrl = keep_last && ch == half - 1;
  const float k2r = ctrl ? 0.f : k2;
  k_row[ch] = tobf(k1 * co - k2r * s);
  k_row[ch + half] = ctrl ? tobf(k2) : tobf(k2r * co + k1 * s);
  v_row[ch] = tobf(v1);
  v_row[ch + half] = tobf(v2);
}

// Appends or merges one token (kt, vt, its merge decision at *merge_h, null: append; its omega)
// at pos into head `head`, as kernels::paged_kv_append: one CTA of D/2 threads, thread c the
// channel pair (c, c + D/2); slot_s and count_s are the CTA's shared words.
__device__ __forceinline__ void append_token(const PagedKv& c, long head, const bf16* kt,
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
  store_pair(c.k_pool + row * D, c.v_pool + row * D, D, ch, k1, k2, v1, v2, pos, theta, keep_last);
  if (ch == 0 && c.slot_pos) c.slot_pos[row] = pos;
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

// Whether token t of a run (a prompt, or a chunk continuing a row) appends a slot. open: the row
// holds a slot that the run's first token may merge into (a chunk after position 0 of a row with
// slots); a prompt's first token always appends.
__device__ __forceinline__ bool appends(const float* merge, int t, int Hkv, int h, bool open) {
  return (t == 0 && !open) || merge == nullptr || merge[static_cast<long>(t) * Hkv + h] <= 0.5f;
}

struct MaxOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return max(a, b); }
};

// Pass (1), one CTA per KV head h of row `row`, over the run's n tokens at positions start ..
// start + n − 1. A prompt (continues false) starts from an empty head, a chunk from the head's
// length and ring count. slot[t, h] = slots before the run + appends in [0, t] − 1; count[t, h]
// (null: not wanted) the ring count after token t: min(t − a + 1, w), a the last append in
// [0, t], or min(ring before + t + 1, w) when there is none; prefix[t, h] (null: not wanted) the
// slots before the run, less the open slot when the first token merges into it. Then the head's
// length and ring count after the run.
__global__ void slot_scan_kernel(PagedKv c, int row, bool continues, int start, const float* merge,
                                 int n, int Hkv, int32_t* slot, int32_t* count, int* prefix) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int h = blockIdx.x, w = c.window_size;
  const long head = static_cast<long>(row) * Hkv + h;
  const int before = continues ? c.lengths[head] : 0;
  const int ring_before = continues && w > 0 ? c.window_count[head] : 0;
  const bool open = continues && before > 0 && start > 0;
  if (prefix != nullptr) {
    const int seen = before - (appends(merge, 0, Hkv, h, open) ? 0 : 1);
    for (int t = threadIdx.x; t < n; t += blockDim.x) prefix[static_cast<long>(t) * Hkv + h] = seen;
  }
  int running = before, last_append = -1;  // over the tiles scanned so far
  for (int base = 0; base < n; base += kScanThreads) {
    const int t = base + threadIdx.x;
    const bool a = t < n && appends(merge, t, Hkv, h, open);
    int inclusive, total, latest, latest_total;
    Scan(tmp).InclusiveSum(a ? 1 : 0, inclusive, total);
    __syncthreads();  // tmp is reused
    Scan(tmp).InclusiveScan(a ? t : -1, latest, MaxOp(), latest_total);
    __syncthreads();
    if (t < n) {
      const long g = static_cast<long>(t) * Hkv + h;
      slot[g] = running + inclusive - 1;
      const int last = max(latest, last_append);
      if (count != nullptr)
        count[g] = last >= 0 ? min(t - last + 1, w) : min(ring_before + t + 1, w);
    }
    running += total;
    last_append = max(last_append, latest_total);
  }
  if (threadIdx.x == 0) {  // every thread read the head's state before the loop's first barrier
    c.lengths[head] = running;
    if (w > 0)
      c.window_count[head] =
          last_append >= 0 ? min(n - last_append, w) : min(ring_before + n, w);
  }
}

// Pass (2) of a chunk, one CTA of D/2 threads per (t, h): the slot token t leaves, as n appends
// leave it after t: w > 0, the omega-weighted mean over the count[t, h] newest positions up to
// start + t, oldest first (those before the chunk from the row's ring, the others the chunk's
// raw k, v, omega); w = 0, the token's k, v. Rotated at start + t into k̂, v̂ [t, h]; into the
// pool (and slot_pos) when the slot is final at t.
__global__ void extend_slots_kernel(PagedKv c, int row, const int32_t* slot, const int32_t* count,
                                    const bf16* k, const bf16* v, const float* merge,
                                    const float* omega, int start, int n, int Hkv, int D,
                                    float theta, bool keep_last, bf16* khat, bf16* vhat) {
  const int t = blockIdx.x / Hkv, h = blockIdx.x % Hkv, ch = threadIdx.x, half = D / 2;
  const int w = c.window_size, pos = start + t;
  const long head = static_cast<long>(row) * Hkv + h, g = static_cast<long>(t) * Hkv + h;
  float k1 = bf(k[g * D + ch]), k2 = bf(k[g * D + ch + half]);
  float v1 = bf(v[g * D + ch]), v2 = bf(v[g * D + ch + half]);
  if (w > 0) {
    const long entry = 2L * D + 1;
    const float* ring = c.window + head * w * entry;
    float denom = 0.f, sk1 = 0.f, sk2 = 0.f, sv1 = 0.f, sv2 = 0.f;
    for (int p = pos - count[g] + 1; p <= pos; ++p) {
      float om, a1, a2, b1, b2;
      if (p >= start) {
        const long src = static_cast<long>(p - start) * Hkv + h;
        om = omega ? omega[src] : 1.f;
        a1 = bf(k[src * D + ch]);
        a2 = bf(k[src * D + ch + half]);
        b1 = bf(v[src * D + ch]);
        b2 = bf(v[src * D + ch + half]);
      } else {
        const float* r = ring + (p % w) * entry;
        om = r[2 * D];
        a1 = r[ch];
        a2 = r[ch + half];
        b1 = r[D + ch];
        b2 = r[D + ch + half];
      }
      denom += om;
      sk1 = fmaf(om, a1, sk1);
      sk2 = fmaf(om, a2, sk2);
      sv1 = fmaf(om, b1, sv1);
      sv2 = fmaf(om, b2, sv2);
    }
    const float inv = 1.f / denom;
    k1 = sk1 * inv;
    k2 = sk2 * inv;
    v1 = sv1 * inv;
    v2 = sv2 * inv;
  }
  store_pair(khat + g * D, vhat + g * D, D, ch, k1, k2, v1, v2, pos, theta, keep_last);
  if (t + 1 < n && !appends(merge, t + 1, Hkv, h, true)) return;  // the next token rewrites it
  const long r = kernels::SlotRow(c, head, slot[g]);
  store_pair(c.k_pool + r * D, c.v_pool + r * D, D, ch, k1, k2, v1, v2, pos, theta, keep_last);
  if (ch == 0 && c.slot_pos) c.slot_pos[r] = pos;
}

// Pass (2) of a prompt, one CTA of D/2 threads per (t, h): writes slot[t, h] when it is final at t.
__global__ void prefill_slots_kernel(PagedKv c, int row, const int32_t* slot, const bf16* khat,
                                     const bf16* vhat, const float* merge, int P, int Hkv, int D,
                                     float theta, bool keep_last) {
  const int t = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  if (t + 1 < P && !appends(merge, t + 1, Hkv, h, false)) return;
  const long head = static_cast<long>(row) * Hkv + h;
  const long src = (static_cast<long>(t) * Hkv + h) * D;
  const int ch = threadIdx.x, half = D / 2;
  const long r = kernels::SlotRow(c, head, slot[static_cast<long>(t) * Hkv + h]);
  store_pair(c.k_pool + r * D, c.v_pool + r * D, D, ch, bf(khat[src + ch]),
             bf(khat[src + ch + half]), bf(vhat[src + ch]), bf(vhat[src + ch + half]), t, theta,
             keep_last);
  if (ch == 0 && c.slot_pos) c.slot_pos[r] = t;
}

// Pass (3), one CTA per (ring entry e < w, h): the raw token of position start + n − 1 − e
// (token n − 1 − e of the run) into the ring, for e below the head's ring count (a prompt: the
// open slot's tokens) or below n (a chunk: each of its tokens entered the ring, as its append
// does).
__global__ void window_kernel(PagedKv c, int row, const bf16* k, const bf16* v, const float* omega,
                              int start, int n, int Hkv, int D, bool every_token) {
  const int w = c.window_size;
  const int e = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  const long head = static_cast<long>(row) * Hkv + h;
  if (e >= (every_token ? n : c.window_count[head])) return;
  const int t = n - 1 - e;
  float* dst = c.window + (head * w + (start + t) % w) * (2L * D + 1);
  const long src = (static_cast<long>(t) * Hkv + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    dst[d] = bf(k[src + d]);
    dst[D + d] = bf(v[src + d]);
  }
  if (threadIdx.x == 0) dst[2 * D] = omega ? omega[static_cast<long>(t) * Hkv + h] : 1.f;
}

}  // namespace

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
  const size_t tokens = static_cast<size_t>(n) * Hkv;
  auto* slot = static_cast<int32_t*>(scratch(kSlotScratch, sizeof(int32_t) * 2 * tokens));
  int32_t* count = slot + tokens;
  const bool window = cache.window_size > 0;
  slot_scan_kernel<<<Hkv, kScanThreads, 0, stream>>>(cache, row, /*continues=*/true, start, merge,
                                                     n, Hkv, slot, window ? count : nullptr,
                                                     prefix);
  DMC_CUDA_CHECK_LAUNCH();
  extend_slots_kernel<<<static_cast<unsigned>(tokens), D / 2, 0, stream>>>(
      cache, row, slot, count, k, v, merge, omega, start, n, Hkv, D, theta, keep_last_channel,
      khat, vhat);
  DMC_CUDA_CHECK_LAUNCH();
  if (window) {
    window_kernel<<<cache.window_size * Hkv, 128, 0, stream>>>(cache, row, k, v, omega, start, n,
                                                               Hkv, D, /*every_token=*/true);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

void paged_kv_prefill(const PagedKv& cache, int row, const bf16* khat, const bf16* vhat,
                      const bf16* k, const bf16* v, const float* merge, const float* omega, int P,
                      int Hkv, int D, float theta, bool keep_last_channel, cudaStream_t stream) {
  if (P <= 0) return;
  auto* slot = static_cast<int32_t*>(scratch(kSlotScratch, sizeof(int32_t) * P * Hkv));
  slot_scan_kernel<<<Hkv, kScanThreads, 0, stream>>>(cache, row, /*continues=*/false, 0, merge, P,
                                                     Hkv, slot, nullptr, nullptr);
  DMC_CUDA_CHECK_LAUNCH();
  prefill_slots_kernel<<<P * Hkv, D / 2, 0, stream>>>(cache, row, slot, khat, vhat, merge, P, Hkv,
                                                      D, theta, keep_last_channel);
  DMC_CUDA_CHECK_LAUNCH();
  if (cache.window_size > 0) {
    window_kernel<<<cache.window_size * Hkv, 128, 0, stream>>>(cache, row, k, v, omega, 0, P, Hkv,
                                                               D, /*every_token=*/false);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dmc::cuda
