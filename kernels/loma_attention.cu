// LoMA attention on the GPU (spec: kernels/loma_attention.h; the mask: kernels/loma_mask.h).
// Flash-style: no T × T tensor exists; the forward keeps an online softmax (base 2) and saves
// only the log-sum-exp, the backward recomputes the scores. bf16 in and out, fp32 arithmetic on
// the CUDA cores. A group of 8 lanes owns one row (a query, or a key in the dk/dv pass), lane s
// holding channels s + 8u: a row read from shared memory is then 8 consecutive words (no bank
// conflicts), broadcast to the 4 groups of a warp, and a dot product is 3 shuffles.
//
// The mask is never evaluated over all keys. Its structure (kernels/loma_mask.h: query p sees the
// memory positions before lo(p), and [lo(p), p]; lo is non-decreasing) gives each CTA a short
// list of rows that holds every allowed pair, and only the pairs of that list are masked one by
// one:
//   forward, dq (query-major; CTA = 32 queries [q0, q1) of one head): the keys are the memory
//     positions of the chunks before q0's, then the range [lo(q0), q1). Every query of the tile
//     sees all of the former, and its own range [lo(p), p] lies inside the latter.
//   dk, dv (key-major; CTA = 32 keys of one KV head, looping over its G query heads): a memory CTA
//     takes 32 consecutive memory positions, which every later query sees, so its queries are
//     [first key, T). A range CTA takes 32 consecutive positions and handles their non-memory
//     keys, which only their own zone sees: a reading key j of chunk i is seen by the reading and
//     memory queries of chunk i at or after j, a repetition key by the repetition queries of its
//     chunk at or after it, so its queries are [k0, end(last key)), end(j) being the end of the
//     memory zone (j reading or memory) or of the chunk (j repetition) of j's chunk. Memory keys
//     of a range CTA's span are left to the memory CTAs.
// So a query costs its earlier memory slots plus about one chunk of keys, not all of 0..p: far
// more than skipping the tiles the mask hides whole, which almost no tile is when chunks are
// short (every 32-key tile holds memory slots once S = t·(2c+1) <= 32).
// The backward runs dq and dk/dv as two passes that each sum complete rows, so there are no
// atomics and the result is deterministic (and each output row, written once, needs no zeroing
// when not accumulated); the dq pass also stores Delta = rowsum(dout · out).
#include <climits>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kLanes = 8;                 // lanes per row
constexpr int kRows = 32;                 // rows (queries or keys) a CTA owns
constexpr int kThreads = kRows * kLanes;  // 256
constexpr int kTile = 32;                 // rows staged in shared memory per step

// The zone arithmetic of kernels/loma_mask.h for device code (its functions are host-only).
struct Zones {
  int t, tc, S;  // memory slots, text tokens and layout positions per chunk

  __host__ __device__ bool is_memory(int p) const {
    const int o = p % S;
    return o >= tc && o < tc + t;
  }
  // lo(p) = loma_range_start(p): the first key of the range [lo(p), p] query p sees.
  __host__ __device__ int range_start(int p) const {
    const int o = p % S;
    return p - o + (o >= tc + t ? tc : 0);
  }
  // end(j): one past the last query that sees the non-memory key j (see the top).
  __host__ __device__ int range_end(int j) const {
    const int o = j % S;
    return j - o + (o < tc + t ? tc + t : S);
  }
  // The m-th memory position of the layout (slot m % t of chunk m / t).
  __host__ __device__ int memory_position(int m) const { return m / t * S + tc + m % t; }
  // The number of memory positions before position n.
  __host__ __device__ int memories_before(int n) const {
    const int o = n % S - tc;
    return n / S * t + (o < 0 ? 0 : o > t ? t : o);
  }
};

Zones zones_of(const kernels::LomaZones& z) { return {z.t, z.segment(), z.chunk()}; }

// Sum over the 8 lanes of a row group; every lane of the group gets it (the same bits).
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  return x;
}

// This lane's channels sub + 8u of a bf16 row, times scale; zeros for a row past T.
template <int D>
__device__ __forceinline__ void load_row(float (&x)[D / kLanes], const bf16* row, int sub,
                                         float scale, bool live) {
#pragma unroll
  for (int u = 0; u < D / kLanes; ++u) x[u] = live ? bf(row[sub + kLanes * u]) * scale : 0.f;
}

__device__ __forceinline__ void store8f(float* dst, const float (&f)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

// Rows row_of(r), r < count, of two bf16 matrices with the same layout (K and V, or Q and dO)
// into fp32 shared tiles. Rows from count on are zero: their scores are masked, and zeros keep
// the products with the masked probabilities finite.
template <int D, typename RowOf>
__device__ __forceinline__ void stage_rows(float (*a)[D], float (*b)[D], const bf16* ga,
                                           const bf16* gb, long stride, int count, RowOf row_of) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    float fa[8] = {}, fb[8] = {};
    if (r < count) {
      const long off = static_cast<long>(row_of(r)) * stride + c;
      load8(fa, ga + off);
      load8(fb, gb + off);
    }
    store8f(&a[r][c], fa);
    store8f(&b[r][c], fb);
  }
}

// The keys of the query tile [q0, q1) in increasing order (see the top).
struct TileKeys {
  int memory, lo, count;
  __device__ TileKeys(int q0, int q1, const Zones& z)
      : memory(q0 / z.S * z.t), lo(z.range_start(q0)), count(memory + q1 - lo) {}
  __device__ int at(int n, const Zones& z) const {
    return n < memory ? z.memory_position(n) : lo + n - memory;
  }
};

// Shared memory of the query-major kernels: kTile keys of the list, their K and V rows, their
// positions and whether they are memory slots.
template <int D>
struct KeyTile {
  float k[kTile][D], v[kTile][D];
  int key[kTile];
  bool memory[kTile];
};

// One CTA of the query-major kernels (forward, dq): grid (query tiles, H, B), the last tiles
// (the longest key lists) first; 8-lane group r owns query p = q0 + r of head g.
template <int D>
struct QueryTile {
  int q0, g, b, sub, p, lo_p;
  bool live;  // rows past T compute along (the shuffles need every lane) but write nothing
  long qoff, row;       // offsets of this query in [B, T, H, D] and in [B, H, T]
  long kstride, kv0;    // row stride of k/v and the offset of this head's KV head at t = 0
  const bf16 *kb, *vb;
  TileKeys keys;

  __device__ QueryTile(const bf16* k, const bf16* v, int T, int H, int Hkv, const Zones& z)
      : q0((gridDim.x - 1 - blockIdx.x) * kRows),
        g(blockIdx.y),
        b(blockIdx.z),
        sub(threadIdx.x % kLanes),
        p(q0 + threadIdx.x / kLanes),
        lo_p(z.range_start(p)),
        live(p < T),
        qoff((static_cast<long>(b) * T + p) * H * D + static_cast<long>(g) * D),
        row((static_cast<long>(b) * H + g) * T + p),
        kstride(static_cast<long>(Hkv) * D),
        kv0(static_cast<long>(b) * T * kstride + static_cast<long>(g / (H / Hkv)) * D),
        kb(k + kv0),
        vb(v + kv0),
        keys(q0, min(T, q0 + kRows), z) {}

  // Keys n0 .. n0 + nk - 1 of the list into the tile (past nk: position INT_MAX, which no query
  // sees), between the barriers that protect the previous and this tile.
  __device__ void stage(KeyTile<D>& t, int n0, int nk, const Zones& z) const {
    __syncthreads();
    stage_rows<D>(t.k, t.v, kb, vb, kstride, nk, [&](int r) { return keys.at(n0 + r, z); });
    if (threadIdx.x < kTile) {
      const bool valid = static_cast<int>(threadIdx.x) < nk;
      const int key = valid ? keys.at(n0 + threadIdx.x, z) : INT_MAX;
      t.key[threadIdx.x] = key;
      t.memory[threadIdx.x] = valid && z.is_memory(key);
    }
    __syncthreads();
  }
  __device__ bool sees(const KeyTile<D>& t, int j) const {
    return t.key[j] <= p && (t.key[j] >= lo_p || t.memory[j]);
  }
};

// ---------------------------------------------------------------- forward
template <int D>
__global__ void __launch_bounds__(kThreads) loma_fwd_kernel(bf16* out, float* lse, const bf16* q,
                                                            const bf16* k, const bf16* v, int T,
                                                            int H, int Hkv, Zones z,
                                                            float scale_log2) {
  constexpr int kPer = D / kLanes;
  __shared__ __align__(16) KeyTile<D> tile;
  const QueryTile<D> qt(k, v, T, H, Hkv, z);
  const int sub = qt.sub;

  float qv[kPer], o[kPer];
  load_row<D>(qv, q + qt.qoff, sub, scale_log2, qt.live);  // scores come out in base 2
#pragma unroll
  for (int u = 0; u < kPer; ++u) o[u] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int n0 = 0; n0 < qt.keys.count; n0 += kTile) {
    qt.stage(tile, n0, min(kTile, qt.keys.count - n0), z);
    float s[kTile], mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float d = 0.f;
#pragma unroll
      for (int u = 0; u < kPer; ++u) d += qv[u] * tile.k[j][sub + kLanes * u];
      d = group_sum(d);
      s[j] = qt.sees(tile, j) ? d : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
    if (mx > -INFINITY) {  // else the query sees no key of this tile, and nothing changes
      const float m_new = fmaxf(m, mx), corr = exp2f(m - m_new);
      l *= corr;
#pragma unroll
      for (int u = 0; u < kPer; ++u) o[u] *= corr;
#pragma unroll
      for (int j = 0; j < kTile; ++j) {
        const float pj = exp2f(s[j] - m_new);
        l += pj;
#pragma unroll
        for (int u = 0; u < kPer; ++u) o[u] += pj * tile.v[j][sub + kLanes * u];
      }
      m = m_new;
    }
  }
  if (!qt.live) return;
  // The query sees itself, which is in the list's range part, so l > 0.
  const float inv = 1.f / l;
#pragma unroll
  for (int u = 0; u < kPer; ++u) out[qt.qoff + sub + kLanes * u] = tobf(o[u] * inv);
  if (sub == 0 && lse) lse[qt.row] = (m + log2f(l)) * kLn2;
}

// ---------------------------------------------------------------- backward
// dq pass, on the forward's tiling: dq[p] += scale sum_j dS[p, j] k[j], where
// dS = P (dout[p]·v[j] - Delta) and P = exp(s - lse). Writes Delta[b, g, p] = dout[p]·out[p] for
// the dk/dv pass.
template <int D>
__global__ void __launch_bounds__(kThreads)
    loma_bwd_dq_kernel(bf16* dq, float* delta, const bf16* dout, const bf16* q, const bf16* k,
                       const bf16* v, const bf16* out, const float* lse, int T, int H, int Hkv,
                       Zones z, float scale, float scale_log2, bool accumulate) {
  constexpr int kPer = D / kLanes;
  __shared__ __align__(16) KeyTile<D> tile;
  const QueryTile<D> qt(k, v, T, H, Hkv, z);
  const int sub = qt.sub;

  float qv[kPer], gv[kPer], acc[kPer];
  load_row<D>(qv, q + qt.qoff, sub, scale_log2, qt.live);
  load_row<D>(gv, dout + qt.qoff, sub, 1.f, qt.live);
  float dl = 0.f;  // Delta of this row
  {
    float ov[kPer];
    load_row<D>(ov, out + qt.qoff, sub, 1.f, qt.live);
#pragma unroll
    for (int u = 0; u < kPer; ++u) dl += gv[u] * ov[u];
  }
  dl = group_sum(dl);
#pragma unroll
  for (int u = 0; u < kPer; ++u) acc[u] = 0.f;
  const float lse2 = qt.live ? lse[qt.row] * kLog2e : 0.f;
  for (int n0 = 0; n0 < qt.keys.count; n0 += kTile) {
    qt.stage(tile, n0, min(kTile, qt.keys.count - n0), z);
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        s += qv[u] * tile.k[j][sub + kLanes * u];
        dp += gv[u] * tile.v[j][sub + kLanes * u];
      }
      s = group_sum(s);
      dp = group_sum(dp);
      const float pr = qt.sees(tile, j) ? exp2f(s - lse2) : 0.f;
      const float ds = pr * (dp - dl);
#pragma unroll
      for (int u = 0; u < kPer; ++u) acc[u] += ds * tile.k[j][sub + kLanes * u];
    }
  }
  if (!qt.live) return;
  if (sub == 0) delta[qt.row] = dl;
  if (dq)
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      bf16& d = dq[qt.qoff + sub + kLanes * u];
      d = tobf((accumulate ? bf(d) : 0.f) + scale * acc[u]);
    }
}

// dk/dv pass: grid (memory CTAs + range CTAs, Hkv, B), memory CTAs first (the longest).
//   dv[j] += sum_p P[p, j] dout[p],  dk[j] += scale sum_p dS[p, j] q[p]
// over the G query heads of KV head hk and the queries [qa, qb) that may see the CTA's keys.
template <int D>
__global__ void __launch_bounds__(kThreads)
    loma_bwd_dkdv_kernel(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                         const bf16* v, const float* lse, const float* delta, int T, int H,
                         int Hkv, Zones z, int memories, int memory_ctas, float scale,
                         float scale_log2, bool accumulate) {
  constexpr int kPer = D / kLanes;
  __shared__ __align__(16) float sQ[kTile][D];
  __shared__ __align__(16) float sdO[kTile][D];
  __shared__ int sPos[kTile], sLo[kTile];
  __shared__ float sLse2[kTile], sDelta[kTile];

  const int hk = blockIdx.y, b = blockIdx.z, G = H / Hkv;
  const int sub = threadIdx.x % kLanes, r = threadIdx.x / kLanes;
  int key, qa, qb;
  bool owns;  // this row's key is one whose dk/dv this CTA writes
  if (static_cast<int>(blockIdx.x) < memory_ctas) {
    const int m0 = blockIdx.x * kRows;
    owns = m0 + r < memories;
    key = owns ? z.memory_position(m0 + r) : T;
    qa = z.memory_position(m0);
    qb = T;
  } else {
    const int k0 = (blockIdx.x - memory_ctas) * kRows;
    key = k0 + r;
    owns = key < T && !z.is_memory(key);
    qa = k0;
    qb = min(T, z.range_end(min(T, k0 + kRows) - 1));
  }
  const bool key_memory = z.is_memory(key);
  const long qstride = static_cast<long>(H) * D, kstride = static_cast<long>(Hkv) * D;
  const long koff = (static_cast<long>(b) * T + key) * kstride + static_cast<long>(hk) * D;

  float kv[kPer], vv[kPer], gk[kPer], gv[kPer];
  load_row<D>(kv, k + koff, sub, scale_log2, owns);
  load_row<D>(vv, v + koff, sub, 1.f, owns);
#pragma unroll
  for (int u = 0; u < kPer; ++u) gk[u] = gv[u] = 0.f;
  for (int h = hk * G; h < (hk + 1) * G; ++h) {
    const long qh = static_cast<long>(b) * T * qstride + static_cast<long>(h) * D;
    const long rows = (static_cast<long>(b) * H + h) * T;
    for (int p0 = qa; p0 < qb; p0 += kTile) {
      const int np = min(kTile, qb - p0);
      __syncthreads();  // the previous tile is consumed
      stage_rows<D>(sQ, sdO, q + qh, dout + qh, qstride, np, [&](int i) { return p0 + i; });
      if (threadIdx.x < kTile) {
        const int i = threadIdx.x, pq = p0 + i;
        const bool valid = i < np;
        sPos[i] = valid ? pq : -1;  // no key is at or before -1
        sLo[i] = valid ? z.range_start(pq) : 0;
        sLse2[i] = valid ? lse[rows + pq] * kLog2e : 0.f;
        sDelta[i] = valid ? delta[rows + pq] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) {
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          s += kv[u] * sQ[j][sub + kLanes * u];
          dp += vv[u] * sdO[j][sub + kLanes * u];
        }
        s = group_sum(s);
        dp = group_sum(dp);
        const bool allowed = key <= sPos[j] && (key >= sLo[j] || key_memory);
        const float pr = allowed ? exp2f(s - sLse2[j]) : 0.f;
        const float ds = pr * (dp - sDelta[j]);
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          gv[u] += pr * sdO[j][sub + kLanes * u];
          gk[u] += ds * sQ[j][sub + kLanes * u];
        }
      }
    }
  }
  if (!owns) return;
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const long i = koff + sub + kLanes * u;
    if (dk) dk[i] = tobf((accumulate ? bf(dk[i]) : 0.f) + scale * gk[u]);
    if (dv) dv[i] = tobf((accumulate ? bf(dv[i]) : 0.f) + gv[u]);
  }
}

void check_shape(int H, int Hkv, int D, const kernels::LomaZones& z) {
  if (D != 64 && D != 128) {
    std::fprintf(stderr, "loma_attention: head dim %d unsupported (64 or 128)\n", D);
    std::abort();
  }
  if (Hkv <= 0 || H % Hkv != 0) {
    std::fprintf(stderr, "loma_attention: H=%d is not a multiple of Hkv=%d\n", H, Hkv);
    std::abort();
  }
  if (z.t < 1 || z.c < 1) {
    std::fprintf(stderr, "loma_attention: zones t=%d, c=%d (both must be >= 1)\n", z.t, z.c);
    std::abort();
  }
}

}  // namespace

void loma_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                            int B, int T, int H, int Hkv, int D, const kernels::LomaZones& z,
                            float scale, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  check_shape(H, Hkv, D, z);
  const dim3 grid(ceil_div(T, kRows), H, B);
  const float scale_log2 = scale * kLog2e;
  if (D == 64)
    loma_fwd_kernel<64><<<grid, kThreads, 0, stream>>>(out, lse, q, k, v, T, H, Hkv, zones_of(z),
                                                        scale_log2);
  else
    loma_fwd_kernel<128><<<grid, kThreads, 0, stream>>>(out, lse, q, k, v, T, H, Hkv, zones_of(z),
                                                         scale_log2);
  DMC_CUDA_CHECK_LAUNCH();
}

void loma_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                             const bf16* k, const bf16* v, const bf16* out, const float* lse,
                             int B, int T, int H, int Hkv, int D, const kernels::LomaZones& z,
                             float scale, bool accumulate, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  check_shape(H, Hkv, D, z);
  const Zones zones = zones_of(z);
  const float scale_log2 = scale * kLog2e;
  float* delta = static_cast<float*>(scratch(kScratchLomaDelta, sizeof(float) * B * H * T));
  // The dq pass always runs: it computes Delta, which the dk/dv pass needs.
  const dim3 grid_q(ceil_div(T, kRows), H, B);
  if (D == 64)
    loma_bwd_dq_kernel<64><<<grid_q, kThreads, 0, stream>>>(dq, delta, dout, q, k, v, out, lse, T,
                                                             H, Hkv, zones, scale, scale_log2,
                                                             accumulate);
  else
    loma_bwd_dq_kernel<128><<<grid_q, kThreads, 0, stream>>>(dq, delta, dout, q, k, v, out, lse, T,
                                                              H, Hkv, zones, scale, scale_log2,
                                                              accumulate);
  DMC_CUDA_CHECK_LAUNCH();
  if (!dk && !dv) return;
  const int memories = zones.memories_before(T), memory_ctas = ceil_div(memories, kRows);
  const dim3 grid_kv(memory_ctas + ceil_div(T, kRows), Hkv, B);
  if (D == 64)
    loma_bwd_dkdv_kernel<64><<<grid_kv, kThreads, 0, stream>>>(
        dk, dv, dout, q, k, v, lse, delta, T, H, Hkv, zones, memories, memory_ctas, scale,
        scale_log2, accumulate);
  else
    loma_bwd_dkdv_kernel<128><<<grid_kv, kThreads, 0, stream>>>(
        dk, dv, dout, q, k, v, lse, delta, T, H, Hkv, zones, memories, memory_ctas, scale,
        scale_log2, accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
