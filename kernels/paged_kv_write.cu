// Paged KV cache writes on the GPU (spec: kernels/paged_kv_write.h).
// append:  a warp per (row, KV head), kAppendWarps to a CTA, no block barrier (D 32, 64 or 128).
//          Every lane reads the head's state and decides append or merge, the slot and the ring
//          count alike (lane 0 writes them back); lane l holds channels l·D/32 .. (l + 1)·D/32 − 1
//          of the key and the value, so a ring entry's key and value (bf16: the projections'
//          outputs as they are) come in as one 8-byte (D 128), 4-byte (D 64) or 2-byte (D 32)
//          load each per lane, 8 or 16 entries in flight, summed oldest first as the reference
//          sums them, the token's own term last, from registers. The slot's RoPE sines and
//          cosines are computed before the ring is read, so that they overlap its loads; RoPE
//          pairs channel c < D/2 with c + D/2, lane l + 16's (a shuffle).
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

#include <cstdio>
#include <cstdlib>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kAppendWarps = 4;  // heads per CTA of the append, a warp each
// CTAs of the append an SM must hold at once at head dim 128 (registers capped to fit): 24 warps
// an SM, 3,168 on 132 SMs, one wave for a step's (row, KV head) pairs up to 99 rows of the 7B
// shape's 32 KV heads, where 120 registers (4 CTAs) took 1.4 waves of the append's chain of
// dependent loads at 91 rows (bench/RESULTS.md, entry 35). The GQA shapes' few KV heads fill a
// wave without it.
constexpr int kAppendBlocksPerSm = 6;
constexpr int kRingBatch = 8;    // ring entries a lane of the append loads before it sums them
                                 // at head dim 128 (twice as many below: registers allow)
constexpr int kScanThreads = 256;

// The rotation of key channel pair (ch, ch + D/2) at pos, as kernels/rope.cu: its sine and
// cosine, and whether the pair holds the control channel D − 1, kept and left out of the rotation
// when keep_last.
struct PairRotation {
  float sin, cos;
  bool ctrl;
};
__device__ __forceinline__ PairRotation pair_rotation(int D, int ch, int pos, float theta,
                                                      bool keep_last) {
  PairRotation r;
  sincosf(rope_angle(pos, ch, D, theta), &r.sin, &r.cos);
  r.ctrl = keep_last && ch == D / 2 - 1;
  return r;
}
__device__ __forceinline__ float2 rotate(float x1, float x2, PairRotation r) {
  const float x2r = r.ctrl ? 0.f : x2;
  return make_float2(x1 * r.cos - x2r * r.sin, r.ctrl ? x2 : x2r * r.cos + x1 * r.sin);
}

// Thread c < D/2: rotates the pair (key[c], key[c + D/2]) at pos and stores it in k_row, the value
// pair in v_row (a slot's rows of the pools, or of k̂ and v̂).
__device__ __forceinline__ void store_pair(bf16* k_row, bf16* v_row, int D, int ch, float k1,
                                           float k2, float v1, float v2, int pos, float theta,
                                           bool keep_last) {
  const int half = D / 2;
  const float2 r = rotate(k1, k2, pair_rotation(D, ch, pos, theta, keep_last));
  k_row[ch] = tobf(r.x);
  k_row[ch + half] = tobf(r.y);
  v_row[ch] = tobf(v1);
  v_row[ch + half] = tobf(v2);
}

// C bf16 values as one load brings them (8, 4 or 2 bytes), not yet widened: a ring entry in flight
// holds half the registers its floats would.
template <int C>
struct alignas(2 * C) Bf16s {
  bf16 x[C];
};

// C = 1, 2 or 4 consecutive bf16 values in one access (2-, 4- or 8-byte aligned), widened.
template <int C>
__device__ __forceinline__ void load_bf16s(const bf16* p, float (&x)[C]) {
  const Bf16s<C> raw = *reinterpret_cast<const Bf16s<C>*>(p);
#pragma unroll
  for (int j = 0; j < C; ++j) x[j] = __bfloat162float(raw.x[j]);
}
template <int C>
__device__ __forceinline__ void store_bf16s(bf16* p, const float (&x)[C]) {
  if constexpr (C == 1) {
    *p = tobf(x[0]);
  } else {
    alignas(8) __nv_bfloat162 h[C / 2];
#pragma unroll
    for (int j = 0; j < C / 2; ++j) h[j] = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
    if constexpr (C == 4)
      *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(h);
    else
      *reinterpret_cast<__nv_bfloat162*>(p) = h[0];
  }
}

// Channel j of a ring entry as loaded, or of the token's own key or value (already floats).
template <int C>
__device__ __forceinline__ float channel(const Bf16s<C>& x, int j) {
  return __bfloat162float(x.x[j]);
}
template <int C>
__device__ __forceinline__ float channel(const float (&x)[C], int j) {
  return x[j];
}

// One ring entry's (or the token's own) term of the omega-weighted sums.
template <int C, typename Values>
__device__ __forceinline__ void accumulate(float om, const Values& kx, const Values& vx,
                                           float& denom, float (&sk)[C], float (&sv)[C]) {
  denom += om;
#pragma unroll
  for (int j = 0; j < C; ++j) {
    sk[j] = fmaf(om, channel<C>(kx, j), sk[j]);
    sv[j] = fmaf(om, channel<C>(vx, j), sv[j]);
  }
}

// kernels::paged_kv_append, a warp per head = i · Hkv + h < heads; lane l holds channels
// l·C .. l·C + C − 1 of the token's key and value, then of the slot's.
template <int D>
__global__ void __launch_bounds__(32 * kAppendWarps, D == 128 ? kAppendBlocksPerSm : 1)
    append_kernel(PagedKv c, const bf16* k, const bf16* v, long kv_ld, const float* merge,
                  const float* omega, const int32_t* positions, int heads, int Hkv, float theta,
                  bool keep_last) {
  producer_done();
  constexpr int C = D / 32;
  const long head = static_cast<long>(blockIdx.x) * kAppendWarps + threadIdx.x / 32;
  if (head >= heads) return;  // the whole warp
  const int lane = threadIdx.x % 32, w = c.window_size;
  // Every load of the head's state (and the token's) is issued before any result is needed.
  const int pos = positions[static_cast<int>(head) / Hkv], len = c.lengths[head];
  const int held = w > 0 ? c.window_count[head] : 0;
  const float merge_h = merge != nullptr ? merge[head] : 0.f;
  const float om = omega != nullptr ? omega[head] : 1.f;
  float kx[C], vx[C];
  const long token = (head / Hkv) * kv_ld + (head % Hkv) * D + lane * C;
  load_bf16s(k + token, kx);
  load_bf16s(v + token, vx);
  const bool m = len > 0 && pos > 0 && merge_h > 0.5f;
  const int count = m ? min(held + 1, w) : 1;  // the ring's entries with this token (w > 0)
  const long row = kernels::SlotRow(c, head, m ? len - 1 : len);
  __syncwarp();  // every lane has read lengths and window_count before lane 0 rewrites them
  if (lane == 0) {
    if (!m) c.lengths[head] = len + 1;
    if (w > 0) c.window_count[head] = count;
  }
  // The slot's rotation, worked out while the ring's loads are in flight (a warp's time here is
  // its chain of dependent steps: few warps share a scheduler at a decode step's size).
  const bool first_half = lane < 16;
  PairRotation rot[C];
#pragma unroll
  for (int j = 0; j < C; ++j)
    rot[j] = pair_rotation(D, (lane % 16) * C + j, pos, theta, keep_last);
  if (w > 0) {
    // The omega-weighted means over the ring's positions pos − count + 1 .. pos, oldest first as
    // the reference sums: the count − 1 older ones read kBatch at a time (entry s, then the next
    // one round the ring), then this token's.
    // 8 entries of 4 channels a lane at D 128 (16 would take too many registers), else 16
    constexpr int kBatch = C == 4 ? kRingBatch : 2 * kRingBatch;
    bf16* ring = c.window + head * w * 2 * D + lane * C;  // this lane's channels of entry 0
    const float* ring_omega = c.window_omega + head * w;
    const int older = count - 1;
    int s = (pos - older) % w;
    float denom = 0.f, sk[C] = {}, sv[C] = {};
    for (int e0 = 0; e0 < older; e0 += kBatch) {
      float eo[kBatch] = {};
      Bf16s<C> ek[kBatch] = {}, ev[kBatch] = {};
#pragma unroll
      for (int e = 0; e < kBatch; ++e) {
        if (e0 + e < older) {
          eo[e] = ring_omega[s];
          ek[e] = *reinterpret_cast<const Bf16s<C>*>(ring + s * 2 * D);
          ev[e] = *reinterpret_cast<const Bf16s<C>*>(ring + s * 2 * D + D);
        }
        s = s + 1 == w ? 0 : s + 1;
      }
#pragma unroll
      for (int e = 0; e < kBatch; ++e)
        if (e0 + e < older) accumulate(eo[e], ek[e], ev[e], denom, sk, sv);
    }
    accumulate(om, kx, vx, denom, sk, sv);
    // The token enters the ring at pos mod w: the entry of pos − w, which the sums left out.
    // kx, vx hold bf16 values, so the ring keeps them exactly.
    const int at = pos % w;
    store_bf16s(ring + at * 2 * D, kx);
    store_bf16s(ring + at * 2 * D + D, vx);
    if (lane == 0) c.window_omega[head * w + at] = om;
    const float inv = 1.f / denom;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      kx[j] = sk[j] * inv;
      vx[j] = sv[j] * inv;
    }
  }
  // RoPE pairs channel ch < D/2 (lane < 16) with ch + D/2 (lane + 16).
  float kr[C];
#pragma unroll
  for (int j = 0; j < C; ++j) {
    const float other = __shfl_xor_sync(0xffffffffu, kx[j], 16);
    const float2 r = rotate(first_half ? kx[j] : other, first_half ? other : kx[j], rot[j]);
    kr[j] = first_half ? r.x : r.y;
  }
  store_bf16s(c.k_pool + row * D + lane * C, kr);
  store_bf16s(c.v_pool + row * D + lane * C, vx);
  if (lane == 0 && c.slot_pos) c.slot_pos[row] = pos;
}

// Whether token t of a run (a prompt, or a chunk continuing a row) appends a slot. open: the row
// holds a slot that the run's first token may merge into (a chunk after position 0 of a row with
// slots); a prompt's first token always appends.
__device__ __forceinline__ bool appends(const float* merge, int t, int Hkv, int h, bool open) {
  return (t == 0 && !open) || merge == nullptr || merge[static_cast<long>(t) * Hkv + h] <= 0.5f;
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "paged_kv_append: %s\n", what);
  std::abort();
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
    const bf16* ring = c.window + head * w * 2 * D;
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
        const bf16* r = ring + (p % w) * 2 * D;
        om = c.window_omega[head * w + p % w];
        a1 = bf(r[ch]);
        a2 = bf(r[ch + half]);
        b1 = bf(r[D + ch]);
        b2 = bf(r[D + ch + half]);
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
  const long entry = head * w + (start + t) % w;
  bf16* dst = c.window + entry * 2 * D;
  const long src = (static_cast<long>(t) * Hkv + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    dst[d] = k[src + d];
    dst[D + d] = v[src + d];
  }
  if (threadIdx.x == 0)
    c.window_omega[entry] = omega ? omega[static_cast<long>(t) * Hkv + h] : 1.f;
}

}  // namespace

void paged_kv_append(const PagedKv& cache, const bf16* k, const bf16* v, const float* merge,
                     const float* omega, const int32_t* positions, int n, int Hkv, int D,
                     float theta, bool keep_last_channel, cudaStream_t stream, long kv_row_stride) {
  if (n <= 0) return;
  if (D != 32 && D != 64 && D != 128) fail("head dim must be 32, 64 or 128");
  const long kv_ld = row_stride_or(kv_row_stride, static_cast<long>(Hkv) * D);
  if (kv_ld % 8) fail("k and v rows must be 16-byte aligned");
  const uintptr_t window = cache.window_size > 0 ? reinterpret_cast<uintptr_t>(cache.window) : 0;
  if ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) |
       reinterpret_cast<uintptr_t>(cache.k_pool) | reinterpret_cast<uintptr_t>(cache.v_pool) |
       window) & 15u)
    fail("k, v, the pools and the window must be 16-byte aligned");
  const int heads = n * Hkv;
  const unsigned grid = (heads + kAppendWarps - 1) / kAppendWarps;
  auto kernel = D == 128 ? append_kernel<128> : D == 64 ? append_kernel<64> : append_kernel<32>;
  launch_dependent(kernel, grid, 32 * kAppendWarps, 0, stream, cache, k, v, kv_ld, merge, omega,
                   positions, heads, Hkv, theta, keep_last_channel);
}

void paged_kv_extend(const PagedKv& cache, int row, const bf16* k, const bf16* v,
                     const float* merge, const float* omega, int start, int n, int Hkv, int D,
                     float theta, bool keep_last_channel, bf16* khat, bf16* vhat, int* prefix,
                     cudaStream_t stream) {
  if (n <= 0) return;
  const size_t tokens = static_cast<size_t>(n) * Hkv;
  auto* slot = static_cast<int32_t*>(scratch(kScratchPagedKvSlots, sizeof(int32_t) * 2 * tokens));
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
  auto* slot = static_cast<int32_t*>(scratch(kScratchPagedKvSlots, sizeof(int32_t) * P * Hkv));
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
