// Fused DMC attention on the GPU (spec: kernels/dmc_attention.h): FlashAttention-2 style tiling on
// bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation, ldmatrix from XOR-swizzled shared
// memory, cp.async double buffering), with the DMC bias added on the fly.
//
// Forward (one CTA per 128-query tile of one head; 8 warps x 16 query rows):
//   for each 64-key tile up to the diagonal: S = Q K^T (Q fragments held in registers; with
//   exclude_ctrl the control channel D-1 of Q is zeroed in the fragments, so it drops out of the
//   dot product), s = S·scale + mask[key]·[key < query] (diagonal exempt), causal and tail
//   masking, online softmax in base 2, O += P V. Saves lse (natural log) per row.
// Backward (one CTA per 64-key tile of one KV head; 4 warps x 16 keys): loops over the G query
//   heads of the group and the query tiles at or after the diagonal; recomputes S^T = K Q^T and
//   P^T = exp(s - lse), then dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - Delta),
//   dK += dS^T Q, dmask[key] += sum_{query > key} dS^T (register accumulators, exact, no
//   atomics), and dQ += dS K through shared memory into an fp32 accumulator with atomics
//   (FlashAttention's scheme). Delta = rowsum(dO · O) comes from a small pre-pass; a post-pass
//   adds the fp32 dQ into the bf16 dq. No T x T buffer exists anywhere.
#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// c += a (16x16, row) * b (16x8, col); bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of (row, 16-byte chunk) in a [rows][COLS] bf16 tile whose chunks are XOR-swizzled
// by row, so that the 8 rows an ldmatrix reads fall into 8 different bank groups.
template <int COLS>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(COLS % 64 == 0, "swizzle needs at least 8 chunks per row");
  return row * COLS + ((chunk ^ (row & 7)) << 3);
}

// rows [row0, row0 + ROWS) of a [T][stride] global matrix (D contiguous bf16 per row) into a
// swizzled tile; rows past T are zero-filled.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* g, int row0, int T, long stride) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += NT) {
    const int r = i / kChunks, c = i % kChunks;
    const bool valid = row0 + r < T;
    const bf16* src = valid ? g + static_cast<long>(row0 + r) * stride + c * 8 : g;
    cp_async16(tile + swz<D>(r, c), src, valid);
  }
}

// ---------------------------------------------------------------- forward
struct FwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const float* mask;
  bf16* out;
  float* lse;
  int B, T, H, Hkv;
  float scale_log2;
  bool exclude_ctrl;
};

template <int D, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32) attn_fwd_kernel(const FwdParams p) {
  static_assert(BM == 16 * NW, "one m16 row block per warp");
  constexpr int NT = NW * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + BM * D;       // [2][BN][D]
  bf16* sV = sK + 2 * BN * D;   // [2][BN][D]
  float* sMask = reinterpret_cast<float*>(sV + 2 * BN * D);  // [2][BN], pre-multiplied by log2 e

  const int T = p.T, H = p.H, Hkv = p.Hkv;
  const int mt = gridDim.x - 1 - blockIdx.x;  // longest rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (H / Hkv);
  const int q0 = mt * BM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long qstride = static_cast<long>(H) * D, kstride = static_cast<long>(Hkv) * D;
  const bf16* qb = p.q + static_cast<long>(b) * T * qstride + static_cast<long>(h) * D;
  const bf16* kb = p.k + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;
  const bf16* vb = p.v + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;
  const float* mb = p.mask ? p.mask + static_cast<long>(b) * T * Hkv + hk : nullptr;

  const int kv_end = min(T, q0 + BM);
  const int ntiles = (kv_end + BN - 1) / BN;

  auto load_kv = [&](int n, int stage) {
    load_tile<BN, D, NT>(sK + stage * BN * D, kb, n * BN, T, kstride);
    load_tile<BN, D, NT>(sV + stage * BN * D, vb, n * BN, T, kstride);
    for (int i = tid; i < BN; i += NT) {
      const int key = n * BN + i;
      sMask[stage * BN + i] = (mb && key < T) ? mb[static_cast<long>(key) * Hkv] * kLog2e : 0.f;
    }
  };

  load_tile<BM, D, NT>(sQ, qb, q0, T, qstride);
  load_kv(0, 0);
  cp_async_commit();

  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  const int row_a = q0 + warp * 16 + lane / 4;  // rows row_a and row_a + 8

  for (int n = 0; n < ntiles; ++n) {
    const int stage = n & 1;
    if (n + 1 < ntiles) load_kv(n + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (n == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[kk], sQ + swz<D>(warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, kk * 2 + lane / 16));
      if (p.exclude_ctrl && (lane % 4) == 3) {  // channel D-1 = k column 15 of the last k-step
        qf[D / 16 - 1][2] &= 0x0000ffffu;
        qf[D / 16 - 1][3] &= 0x0000ffffu;
      }
    }
    const bf16* tK = sK + stage * BN * D;
    const bf16* tV = sV + stage * BN * D;
    const float* tM = sMask + stage * BN;

    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, tK + swz<D>(np * 16 + (lane % 8) + (lane / 16) * 8, kk * 2 + (lane / 8) % 2));
        mma16816(s[2 * np], qf[kk], bb[0], bb[1]);
        mma16816(s[2 * np + 1], qf[kk], bb[2], bb[3]);
      }
    }

    // scale, DMC bias (keys strictly before the query), causal and tail masks; row maxima
    const int kbase = n * BN;
    const bool edge = kbase + BN - 1 >= q0 + warp * 16 || kbase + BN > T;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int cl = nb * 8 + 2 * (lane % 4) + (e & 1);
        const int col = kbase + cl, row = row_a + (e >> 1) * 8;
        float x = s[nb][e] * p.scale_log2;
        if (edge) {
          if (col > row || col >= T)
            x = -INFINITY;
          else if (col < row)
            x += tM[cl];
        } else {
          x += tM[cl];
        }
        s[nb][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float corr[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
      const float m_new = fmaxf(m_i[hh], mx[hh]);
      corr[hh] = exp2f(m_i[hh] - m_new);
      m_i[hh] = m_new;
      l_i[hh] *= corr[hh];
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= corr[0];
      o[i][1] *= corr[0];
      o[i][2] *= corr[1];
      o[i][3] *= corr[1];
    }
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
      const float p0 = exp2f(s[nb][0] - m_i[0]), p1 = exp2f(s[nb][1] - m_i[0]);
      const float p2 = exp2f(s[nb][2] - m_i[1]), p3 = exp2f(s[nb][3] - m_i[1]);
      l_i[0] += p0 + p1;
      l_i[1] += p2 + p3;
      pa[nb / 2][(nb % 2) * 2 + 0] = pack_bf16(p0, p1);
      pa[nb / 2][(nb % 2) * 2 + 1] = pack_bf16(p2, p3);
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_t(bb, tV + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
        mma16816(o[2 * dp], pa[kk], bb[0], bb[1]);
        mma16816(o[2 * dp + 1], pa[kk], bb[2], bb[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 1);
    l_i[hh] += __shfl_xor_sync(0xffffffffu, l_i[hh], 2);
    const int row = row_a + hh * 8;
    if (row >= T) continue;
    const float inv = 1.f / l_i[hh];
    bf16* orow = p.out + (static_cast<long>(b) * T + row) * qstride + static_cast<long>(h) * D;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      const int col = nb * 8 + 2 * (lane % 4);
      *reinterpret_cast<__nv_bfloat162*>(orow + col) =
          __floats2bfloat162_rn(o[nb][2 * hh] * inv, o[nb][2 * hh + 1] * inv);
    }
    if ((lane % 4) == 0 && p.lse)
      p.lse[(static_cast<long>(b) * H + h) * T + row] = (m_i[hh] + log2f(l_i[hh])) * kLn2;
  }
}

// ---------------------------------------------------------------- backward
struct BwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const float* mask;
  const bf16* dout;
  const float* lse;
  const float* delta;
  float* dq_acc;
  bf16* dk;
  bf16* dv;
  float* dmask;
  int B, T, H, Hkv;
  float scale, scale_log2;
  bool exclude_ctrl;
};

// Delta[b, h, t] = sum_d dout · out, one warp per row.
__global__ void attn_bwd_delta(float* delta, const bf16* dout, const bf16* out, int B, int T,
                               int H, int D) {
  const long row = static_cast<long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= static_cast<long>(B) * T * H) return;  // row = (b, t, h)
  const bf16* a = dout + row * D;
  const bf16* c = out + row * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += bf(a[d]) * bf(c[d]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const int h = static_cast<int>(row % H);
    const long bt = row / H;
    const int t = static_cast<int>(bt % T), b = static_cast<int>(bt / T);
    delta[(static_cast<long>(b) * H + h) * T + t] = acc;
  }
}

// dq[i] += dq_acc[i]
__global__ void attn_bwd_dq_add(bf16* dq, const float* dq_acc, long n) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dq[i] = tobf(bf(dq[i]) + dq_acc[i]);
}

template <int D, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32) attn_bwd_kernel(const BwdParams p) {
  static_assert(BN == 16 * NW && BM == 16 * NW, "one m16 block of keys (and of dQ rows) per warp");
  constexpr int NT = NW * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [BN][D]
  bf16* sV = sK + BN * D;                         // [BN][D]
  bf16* sQ = sV + BN * D;                         // [2][BM][D]
  bf16* sdO = sQ + 2 * BM * D;                    // [2][BM][D]
  bf16* sdS = sdO + 2 * BM * D;                   // [BN][BM]
  float* sLse = reinterpret_cast<float*>(sdS + BN * BM);  // [2][BM], times log2 e
  float* sDelta = sLse + 2 * BM;                           // [2][BM]

  const int T = p.T, H = p.H, Hkv = p.Hkv, G = H / Hkv;
  const int nt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int k0 = nt * BN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long qstride = static_cast<long>(H) * D, kstride = static_cast<long>(Hkv) * D;
  const bf16* kb = p.k + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;
  const bf16* vb = p.v + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;

  const int m_first = k0 / BM;
  const int n_m = (T + BM - 1) / BM - m_first;
  const int iters = G * n_m;

  auto load_q = [&](int it, int stage) {
    const int g = it / n_m, mt = m_first + it % n_m;
    const int h = hk * G + g;
    const long off = static_cast<long>(b) * T * qstride + static_cast<long>(h) * D;
    load_tile<BM, D, NT>(sQ + stage * BM * D, p.q + off, mt * BM, T, qstride);
    load_tile<BM, D, NT>(sdO + stage * BM * D, p.dout + off, mt * BM, T, qstride);
    for (int i = tid; i < BM; i += NT) {
      const int t = mt * BM + i;
      const long r = (static_cast<long>(b) * H + h) * T + t;
      sLse[stage * BM + i] = t < T ? p.lse[r] * kLog2e : 0.f;
      sDelta[stage * BM + i] = t < T ? p.delta[r] : 0.f;
    }
  };

  load_tile<BN, D, NT>(sK, kb, k0, T, kstride);
  load_tile<BN, D, NT>(sV, vb, k0, T, kstride);
  load_q(0, 0);
  cp_async_commit();

  const int key_a = k0 + warp * 16 + lane / 4;  // this thread's key rows: key_a, key_a + 8
  float mk[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int key = key_a + hh * 8;
    mk[hh] = (p.mask && key < T) ? p.mask[(static_cast<long>(b) * T + key) * Hkv + hk] * kLog2e : 0.f;
  }
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  float dm[2] = {0.f, 0.f};

  for (int it = 0; it < iters; ++it) {
    const int stage = it & 1;
    if (it + 1 < iters) load_q(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int g = it / n_m, mt = m_first + it % n_m;
    const int h = hk * G + g;
    const int qbase = mt * BM;
    const bf16* tQ = sQ + stage * BM * D;
    const bf16* tdO = sdO + stage * BM * D;
    const float* tL = sLse + stage * BM;
    const float* tD = sDelta + stage * BM;

    // S^T = K Q^T  (16 keys x BM queries per warp)
    float s[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sK + swz<D>(warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, kk * 2 + lane / 16));
      if (kk == D / 16 - 1 && p.exclude_ctrl && (lane % 4) == 3) {
        a[2] &= 0x0000ffffu;
        a[3] &= 0x0000ffffu;
      }
#pragma unroll
      for (int np = 0; np < BM / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, tQ + swz<D>(np * 16 + (lane % 8) + (lane / 16) * 8, kk * 2 + (lane / 8) % 2));
        mma16816(s[2 * np], a, bb[0], bb[1]);
        mma16816(s[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    // P^T
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nb * 8 + 2 * (lane % 4) + (e & 1);
        const int qrow = qbase + ql, key = key_a + (e >> 1) * 8;
        float x = s[nb][e] * p.scale_log2 - tL[ql];
        if (key < qrow) x += mk[e >> 1];
        s[nb][e] = (qrow >= key && qrow < T) ? exp2f(x) : 0.f;
      }
    }
    uint32_t pa[BM / 16][4];
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
      pa[nb / 2][(nb % 2) * 2 + 0] = pack_bf16(s[nb][0], s[nb][1]);
      pa[nb / 2][(nb % 2) * 2 + 1] = pack_bf16(s[nb][2], s[nb][3]);
    }
    // dV += P^T dO
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_t(bb, tdO + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
        mma16816(dv[2 * dp], pa[kk], bb[0], bb[1]);
        mma16816(dv[2 * dp + 1], pa[kk], bb[2], bb[3]);
      }
    }
    // dP^T = V dO^T
    float dpt[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sV + swz<D>(warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, kk * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < BM / 16; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, tdO + swz<D>(np * 16 + (lane % 8) + (lane / 16) * 8, kk * 2 + (lane / 8) % 2));
        mma16816(dpt[2 * np], a, bb[0], bb[1]);
        mma16816(dpt[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    // dS^T = P^T (dP^T - Delta); dmask; stash dS^T in shared memory for dQ
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nb * 8 + 2 * (lane % 4) + (e & 1);
        const float ds = s[nb][e] * (dpt[nb][e] - tD[ql]);
        dpt[nb][e] = ds;
        if (key_a + (e >> 1) * 8 < qbase + ql) dm[e >> 1] += ds;
      }
    }
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
      pa[nb / 2][(nb % 2) * 2 + 0] = pack_bf16(dpt[nb][0], dpt[nb][1]);
      pa[nb / 2][(nb % 2) * 2 + 1] = pack_bf16(dpt[nb][2], dpt[nb][3]);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = warp * 16 + lane / 4 + hh * 8;
        const int c = nb * 8 + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(sdS + swz<BM>(r, c / 8) + (c % 8)) = pa[nb / 2][(nb % 2) * 2 + hh];
      }
    }
    // dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_t(bb, tQ + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
        mma16816(dk[2 * dp], pa[kk], bb[0], bb[1]);
        mma16816(dk[2 * dp + 1], pa[kk], bb[2], bb[3]);
      }
    }
    __syncthreads();  // dS^T complete
    // dQ[rows of this warp] = dS K, in column halves of at most 64 to bound registers
    constexpr int kHalf = D > 64 ? 64 : D;
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += kHalf) {
      float acc[kHalf / 8][4];
#pragma unroll
      for (int i = 0; i < kHalf / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_t(a, sdS + swz<BM>(kk * 16 + (lane % 8) + (lane / 16) * 8, warp * 2 + (lane / 8) % 2));
#pragma unroll
        for (int dp = 0; dp < kHalf / 16; ++dp) {
          uint32_t bb[4];
          ldsm_x4_t(bb, sK + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                     d0 / 8 + dp * 2 + lane / 16));
          mma16816(acc[2 * dp], a, bb[0], bb[1]);
          mma16816(acc[2 * dp + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int qrow = qbase + warp * 16 + lane / 4 + hh * 8;
        if (qrow >= T) continue;
        float* dst = p.dq_acc + (static_cast<long>(b) * T + qrow) * qstride + static_cast<long>(h) * D + d0;
#pragma unroll
        for (int nb = 0; nb < kHalf / 8; ++nb) {
          const int c = nb * 8 + 2 * (lane % 4);
          float v0 = acc[nb][2 * hh] * p.scale, v1 = acc[nb][2 * hh + 1] * p.scale;
          if (p.exclude_ctrl && d0 + c + 1 == D - 1) v1 = 0.f;
          atomicAdd(reinterpret_cast<float2*>(dst + c), make_float2(v0, v1));
        }
      }
    }
    __syncthreads();  // the next prefetch overwrites this stage and sdS
  }

  // write dK (times scale), dV, dmask; accumulate into the outputs
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int key = key_a + hh * 8;
    float dmv = dm[hh];
    dmv += __shfl_xor_sync(0xffffffffu, dmv, 1);
    dmv += __shfl_xor_sync(0xffffffffu, dmv, 2);
    if (key >= T) continue;
    const long off = (static_cast<long>(b) * T + key) * kstride + static_cast<long>(hk) * D;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      const int c = nb * 8 + 2 * (lane % 4);
      float k0v = dk[nb][2 * hh] * p.scale, k1v = dk[nb][2 * hh + 1] * p.scale;
      if (p.exclude_ctrl && c + 1 == D - 1) k1v = 0.f;
      __nv_bfloat162* pk = reinterpret_cast<__nv_bfloat162*>(p.dk + off + c);
      const float2 ok = __bfloat1622float2(*pk);
      *pk = __floats2bfloat162_rn(ok.x + k0v, ok.y + k1v);
      __nv_bfloat162* pv = reinterpret_cast<__nv_bfloat162*>(p.dv + off + c);
      const float2 ov = __bfloat1622float2(*pv);
      *pv = __floats2bfloat162_rn(ov.x + dv[nb][2 * hh], ov.y + dv[nb][2 * hh + 1]);
    }
    if (p.dmask && (lane % 4) == 0)
      p.dmask[(static_cast<long>(b) * T + key) * Hkv + hk] += dmv;
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  DMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <int D>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  constexpr int BM = 128, BN = 64, NW = 8;
  const size_t smem = sizeof(bf16) * (BM * D + 4 * BN * D) + sizeof(float) * 2 * BN;
  auto kernel = attn_fwd_kernel<D, BM, BN, NW>;
  static bool configured = false;
  if (!configured) {
    set_smem(kernel, smem);
    configured = true;
  }
  dim3 grid(ceil_div(p.T, BM), p.H, p.B);
  kernel<<<grid, NW * 32, smem, stream>>>(p);
  DMC_CUDA_CHECK_LAUNCH();
}

template <int D>
void launch_bwd(const BwdParams& p, cudaStream_t stream) {
  constexpr int BM = 64, BN = 64, NW = 4;
  const size_t smem = sizeof(bf16) * (2 * BN * D + 4 * BM * D + BN * BM) + sizeof(float) * 4 * BM;
  auto kernel = attn_bwd_kernel<D, BM, BN, NW>;
  static bool configured = false;
  if (!configured) {
    set_smem(kernel, smem);
    configured = true;
  }
  dim3 grid(ceil_div(p.T, BN), p.Hkv, p.B);
  kernel<<<grid, NW * 32, smem, stream>>>(p);
  DMC_CUDA_CHECK_LAUNCH();
}

void check_shape(int T, int H, int Hkv, int D) {
  if (D != 64 && D != 128) {
    std::fprintf(stderr, "dmc_attention: head dim %d unsupported (64 or 128)\n", D);
    std::abort();
  }
  if (Hkv <= 0 || H % Hkv != 0) {
    std::fprintf(stderr, "dmc_attention: H=%d is not a multiple of Hkv=%d\n", H, Hkv);
    std::abort();
  }
}

}  // namespace

void dmc_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                           const float* mask, int B, int T, int H, int Hkv, int D,
                           bool exclude_ctrl, float scale, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  check_shape(T, H, Hkv, D);
  FwdParams p{q, k, v, mask, out, lse, B, T, H, Hkv, scale * kLog2e, exclude_ctrl};
  if (D == 64)
    launch_fwd<64>(p, stream);
  else
    launch_fwd<128>(p, stream);
}

void dmc_attention_backward(bf16* dq, bf16* dk, bf16* dv, float* dmask, const bf16* dout,
                            const bf16* q, const bf16* k, const bf16* v, const float* mask,
                            const bf16* out, const float* lse, int B, int T, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  check_shape(T, H, Hkv, D);
  const long nq = static_cast<long>(B) * T * H * D;
  const long rows = static_cast<long>(B) * T * H;
  float* dq_acc = static_cast<float*>(scratch(4, sizeof(float) * nq));
  float* delta = static_cast<float*>(scratch(5, sizeof(float) * rows));
  DMC_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, sizeof(float) * nq, stream));
  attn_bwd_delta<<<ceil_div(rows, 8), 256, 0, stream>>>(delta, dout, out, B, T, H, D);
  DMC_CUDA_CHECK_LAUNCH();
  BwdParams p{q,  k,  v,      mask, dout, lse, delta, dq_acc, dk, dv, dmask, B, T, H, Hkv,
              scale, scale * kLog2e, exclude_ctrl};
  if (D == 64)
    launch_bwd<64>(p, stream);
  else
    launch_bwd<128>(p, stream);
  attn_bwd_dq_add<<<ceil_div(nq, 256), 256, 0, stream>>>(dq, dq_acc, nq);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
