// Fused DMC attention on the GPU (spec: kernels/dmc_attention.h): FlashAttention-2 style tiling on
// bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation, ldmatrix from XOR-swizzled shared
// memory, cp.async double buffering), with the DMC bias added on the fly. No T x T buffer exists.
//
// Forward (CTA = 128 queries of one head, 4 warps x 32 rows): for each 64-key tile up to the
//   diagonal: S = Q K^T (with exclude_ctrl the control channel D-1 of Q is zeroed in the A
//   fragments, so it drops out of the dot product), s = S·scale + mask[key]·[query - key > w]
//   (DMC: w = 0, the diagonal exempt; DMS: the band of w + 1 keys exempt), causal and tail masks (only on edge tiles), online softmax in base 2,
//   O += P V. Saves lse (natural log) per row.
// Backward: a pre-pass computes Delta = rowsum(dO · O) and lse·log2 e; the main kernel (CTA = 128
//   keys of one KV head, 8 warps) loops over the G query heads of the group and the 64-row query
//   tiles at or after the diagonal: recomputes S^T = K Q^T and P^T = exp(s - lse), dP^T = V dO^T,
//   dS^T = P^T (dP^T - Delta), dmask[key] += sum_{query > key + w} dS^T (registers, exact, no
//   atomics); P^T and dS^T go through shared memory so the accumulations re-tile: dV += P^T dO,
//   dK += dS^T Q (registers, written once at the end), dQ += dS K into an fp32 accumulator with
//   atomics (FlashAttention's scheme); a post-pass writes it into (or adds it to) the bf16 dq.
//   Each key's dk, dv and dmask are written by one thread, so without `accumulate` they are
//   stored without reading the outputs: only the fp32 dQ accumulator, summed by atomics from
//   every key tile's CTA, is zeroed first.
// On Hopper the forward at head dims 64 and 128 runs kernels/dmc_attention_sm90.cu's kernel and the
// backward kernels/dmc_attention_bwd_sm90.cu's main kernel (between the same pre- and post-pass)
// instead (wgmma; the choice: resolve_forward_kernel, resolve_backward_kernel below); these serve
// every other case and stay tested beside them.
// Versions, timings and the measurements behind each choice: bench/RESULTS.md.
#include <cuda_bf16.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// rows [row0, row0 + ROWS) of a [T][stride] global matrix (D contiguous bf16 per row) into a
// swizzled tile; rows past T are zero-filled.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* g, int row0, int T, long stride) {
  constexpr int kChunks = D / 8;
  static_assert(NT % kChunks == 0 && (NT / kChunks) % 8 == 0, "row step keeps row & 7 fixed");
  constexpr int kRowStep = NT / kChunks;
  static_assert(ROWS % kRowStep == 0, "whole row steps");
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  const bf16* src = g + static_cast<long>(row0 + r0) * stride + c * 8;
  bf16* dst = tile + swz<D>(r0, c);  // the swizzle depends on row & 7 only, fixed per thread
#pragma unroll
  for (int j = 0; j < ROWS / kRowStep; ++j) {
    const bool valid = row0 + r0 + j * kRowStep < T;
    cp_async16(dst + j * kRowStep * D, valid ? src + j * kRowStep * stride : g, valid);
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
  int window;  // the mask applies where query - key > window (DMC: 0; DMS: w)
};

// MB m16 row blocks per warp (32 rows for MB = 2): each K/V fragment read from shared memory
// feeds 2·MB tensor-core instructions, which halves the shared-memory traffic of v1 (16 rows).
template <int D, int BN, int NW, int MB>
__global__ void __launch_bounds__(NW * 32, 2) attn_fwd_kernel(const FwdParams p) {
  constexpr int BM = 16 * MB * NW;
  constexpr int NT = NW * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + BM * D;       // [2][BN][D]
  bf16* sV = sK + 2 * BN * D;   // [2][BN][D]
  float* sMask = reinterpret_cast<float*>(sV + 2 * BN * D);  // [2][BN], pre-multiplied by log2 e

  const int T = p.T, H = p.H, Hkv = p.Hkv;
  // grid (tiles, H, B): the CTAs of one head run together and share its K/V in L2 (making the
  // tile index the slowest dimension, longest-first across heads, measured slower at T8192: L2)
  const int mt = gridDim.x - 1 - blockIdx.x;  // longest rows of the head first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (H / Hkv);
  const int q0 = mt * BM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long qstride = static_cast<long>(H) * D, kstride = static_cast<long>(Hkv) * D;
  const bf16* qb = p.q + static_cast<long>(b) * T * qstride + static_cast<long>(h) * D;
  const bf16* kb = p.k + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;
  const bf16* vb = p.v + static_cast<long>(b) * T * kstride + static_cast<long>(hk) * D;
  const float* mb_ = p.mask ? p.mask + static_cast<long>(b) * T * Hkv + hk : nullptr;

  const int kv_end = min(T, q0 + BM);
  const int ntiles = (kv_end + BN - 1) / BN;

  auto load_kv = [&](int n, int stage) {
    load_tile<BN, D, NT>(sK + stage * BN * D, kb, n * BN, T, kstride);
    load_tile<BN, D, NT>(sV + stage * BN * D, vb, n * BN, T, kstride);
    for (int i = tid; i < BN; i += NT) {
      const int key = n * BN + i;
      sMask[stage * BN + i] = (mb_ && key < T) ? mb_[static_cast<long>(key) * Hkv] * kLog2e : 0.f;
    }
  };

  load_tile<BM, D, NT>(sQ, qb, q0, T, qstride);
  load_kv(0, 0);
  cp_async_commit();

  float o[MB][D / 8][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mb][i][0] = o[mb][i][1] = o[mb][i][2] = o[mb][i][3] = 0.f;
  float m_i[MB][2], l_i[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) m_i[mb][0] = m_i[mb][1] = -INFINITY, l_i[mb][0] = l_i[mb][1] = 0.f;
  const uint32_t offA = lane_off_a<D>(lane), offB = lane_off_b<D>(lane);
  const uint32_t uQ = smem_u32(sQ);
  const int wrow0 = warp * 16 * MB;        // first tile row of this warp
  const int row_a = q0 + wrow0 + lane / 4;  // rows row_a + 16 mb + 8 hh

  for (int n = 0; n < ntiles; ++n) {
    const int stage = n & 1;
    if (n + 1 < ntiles) load_kv(n + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int kbase = n * BN;
    if (kbase <= q0 + wrow0 + 16 * MB - 1) {  // else every key of the tile is after this warp's rows
      const uint32_t uK = smem_u32(sK) + stage * (BN * D * 2);
      const uint32_t uV = smem_u32(sV) + stage * (BN * D * 2);
      const float* tM = sMask + stage * BN;

      float s[MB][BN / 8][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) s[mb][i][0] = s[mb][i][1] = s[mb][i][2] = s[mb][i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MB][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          ldsm_x4(a[mb], frag<D>(uQ, offA, wrow0 + mb * 16, kk));
          if (kk == D / 16 - 1 && p.exclude_ctrl && (lane % 4) == 3) {  // drop channel D-1
            a[mb][2] &= 0x0000ffffu;
            a[mb][3] &= 0x0000ffffu;
          }
        }
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, frag<D>(uK, offB, np * 16, kk));
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            mma16816(s[mb][2 * np], a[mb], bb[0], bb[1]);
            mma16816(s[mb][2 * np + 1], a[mb], bb[2], bb[3]);
          }
        }
      }

      // scale, DMC bias (keys strictly before the query), causal and tail masks, online softmax.
      // Branch-free per element; the bias values are loaded once per tile; interior tiles (all
      // keys before every row of the warp, none past T) skip the index tests entirely.
      const bool edge = kbase + BN - 1 + p.window >= q0 + wrow0 || kbase + BN > T;
      float2 mk[BN / 8];
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb)
        mk[nb] = *reinterpret_cast<const float2*>(tM + nb * 8 + 2 * (lane % 4));
      if (!edge) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int nb = 0; nb < BN / 8; ++nb) {
            s[mb][nb][0] = fmaf(s[mb][nb][0], p.scale_log2, mk[nb].x);
            s[mb][nb][1] = fmaf(s[mb][nb][1], p.scale_log2, mk[nb].y);
            s[mb][nb][2] = fmaf(s[mb][nb][2], p.scale_log2, mk[nb].x);
            s[mb][nb][3] = fmaf(s[mb][nb][3], p.scale_log2, mk[nb].y);
          }
      } else {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = kbase + nb * 8 + 2 * (lane % 4) + (e & 1);
              const int row = row_a + mb * 16 + (e >> 1) * 8;
              const float bias = (e & 1) ? mk[nb].y : mk[nb].x;
              const float x = fmaf(s[mb][nb][e], p.scale_log2, row - col > p.window ? bias : 0.f);
              s[mb][nb][e] = (col > row || col >= T) ? -INFINITY : x;
            }
      }
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
          mx[0] = fmaxf(mx[0], fmaxf(s[mb][nb][0], s[mb][nb][1]));
          mx[1] = fmaxf(mx[1], fmaxf(s[mb][nb][2], s[mb][nb][3]));
        }
        float corr[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
          mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
          // A row whose keys so far are all masked (the causal mask, or DMS's hard -inf) keeps
          // m = -inf; it is taken as 0 there so that no -inf - -inf turns into NaN.
          const float m_new = fmaxf(m_i[mb][hh], mx[hh]);
          corr[hh] = m_new == -INFINITY ? 1.f : ex2(m_i[mb][hh] - m_new);
          m_i[mb][hh] = m_new;
          l_i[mb][hh] *= corr[hh];
        }
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[mb][i][0] *= corr[0];
          o[mb][i][1] *= corr[0];
          o[mb][i][2] *= corr[1];
          o[mb][i][3] *= corr[1];
        }
        const float m0 = m_i[mb][0] == -INFINITY ? 0.f : m_i[mb][0];
        const float m1 = m_i[mb][1] == -INFINITY ? 0.f : m_i[mb][1];
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
          s[mb][nb][0] = ex2(s[mb][nb][0] - m0);
          s[mb][nb][1] = ex2(s[mb][nb][1] - m0);
          s[mb][nb][2] = ex2(s[mb][nb][2] - m1);
          s[mb][nb][3] = ex2(s[mb][nb][3] - m1);
          l_i[mb][0] += s[mb][nb][0] + s[mb][nb][1];
          l_i[mb][1] += s[mb][nb][2] + s[mb][nb][3];
        }
      }
      // O += P V
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t pa[MB][4];
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          pa[mb][0] = pack_bf16(s[mb][2 * kk][0], s[mb][2 * kk][1]);
          pa[mb][1] = pack_bf16(s[mb][2 * kk][2], s[mb][2 * kk][3]);
          pa[mb][2] = pack_bf16(s[mb][2 * kk + 1][0], s[mb][2 * kk + 1][1]);
          pa[mb][3] = pack_bf16(s[mb][2 * kk + 1][2], s[mb][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bb[4];
          ldsm_x4_t(bb, frag<D>(uV, offA, kk * 16, dp));
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            mma16816(o[mb][2 * dp], pa[mb], bb[0], bb[1]);
            mma16816(o[mb][2 * dp + 1], pa[mb], bb[2], bb[3]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

  // Every row has a finite maximum from tile 0 on (key 0 <= every row), so l > 0.
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = l_i[mb][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = row_a + mb * 16 + hh * 8;
      if (row >= T) continue;
      const float inv = 1.f / l;
      bf16* orow = p.out + (static_cast<long>(b) * T + row) * qstride + static_cast<long>(h) * D;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        const int col = nb * 8 + 2 * (lane % 4);
        *reinterpret_cast<__nv_bfloat162*>(orow + col) =
            __floats2bfloat162_rn(o[mb][nb][2 * hh] * inv, o[mb][nb][2 * hh + 1] * inv);
      }
      if ((lane % 4) == 0 && p.lse)
        p.lse[(static_cast<long>(b) * H + h) * T + row] = (m_i[mb][hh] + log2f(l)) * kLn2;
    }
  }
}

// ---------------------------------------------------------------- backward
struct BwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const float* mask;
  const bf16* dout;
  const float* lse2;  // lse · log2 e, written by the pre-pass
  const float* delta;
  int stats_stride;   // of lse2 and delta: attention_stats_stride(T)
  float* dq_acc;
  bf16* dk;
  bf16* dv;
  float* dmask;
  int B, T, H, Hkv;
  float scale, scale_log2;
  bool exclude_ctrl;
  int window;       // as FwdParams::window
  bool accumulate;  // add into dk, dv, dmask (else write them)
};

// Pre-pass: Delta[b, h, t] = sum_d dout · out and lse2 = lse · log2 e (rows stats_stride apart);
// 8 lanes per row, each reading D/64 16-byte vectors of dout and of out.
template <int D>
__global__ void attn_bwd_prepass(float* delta, float* lse2, const float* lse, const bf16* dout,
                                 const bf16* out, int B, int T, int H, int stats_stride) {
  constexpr int kLanes = 8, kVec = D / 8 / kLanes;
  const long row = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;  // (b,t,h)
  const int sub = threadIdx.x % kLanes;
  const bool live = row < static_cast<long>(B) * T * H;  // no early exit: the shuffles need all lanes
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < kVec && live; ++j) {
    float a[8], c[8];
    load8(a, dout + row * D + (sub + j * kLanes) * 8);
    load8(c, out + row * D + (sub + j * kLanes) * 8);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += a[i] * c[i];
  }
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (sub == 0 && live) {
    const int h = static_cast<int>(row % H);
    const long bt = row / H;
    const int t = static_cast<int>(bt % T), b = static_cast<int>(bt / T);
    const long row_bh = static_cast<long>(b) * H + h;
    delta[row_bh * stats_stride + t] = acc;
    lse2[row_bh * stats_stride + t] = lse[row_bh * T + t] * kLog2e;
  }
}

// dq[i..i+7] = (accumulate: +=) dq_acc[i..i+7] (n is a multiple of 8: D is)
__global__ void attn_bwd_dq_out(bf16* dq, const float* dq_acc, long n, bool accumulate) {
  const long i = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  float d[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (accumulate) load8(d, dq + i);
  const float4 a = *reinterpret_cast<const float4*>(dq_acc + i);
  const float4 c = *reinterpret_cast<const float4*>(dq_acc + i + 4);
  d[0] += a.x, d[1] += a.y, d[2] += a.z, d[3] += a.w, d[4] += c.x, d[5] += c.y, d[6] += c.z,
      d[7] += c.w;
  store8(dq + i, d);
}

// Backward CTA: BN = 128 keys of one KV head, 8 warps, query tiles of BM = 64 rows.
// Warp w works on key block kr = w % 4 (32 keys) and query half qc = w / 4 (32 queries) for the
// score-shaped products (S^T, dP^T: 2 x 2 m16 x n16 fragments per k-step, 1 ldmatrix per 2 mma),
// writes P^T and dS^T to shared memory, and after a barrier re-tiles for the accumulations:
// dV, dK += (P^T | dS^T) (dO | Q) for its 32 keys x D/2 columns (half = qc), and dQ = dS K for
// 32 query rows (w % 2) x D/4 columns (w / 2). (FlashAttention-2's backward layout.)
template <int D>
__global__ void __launch_bounds__(256, 1) attn_bwd_kernel(const BwdParams p) {
  constexpr int BM = 64, BN = 128, NW = 8, NT = NW * 32;
  constexpr int kDV = D / 2;   // dK/dV columns per warp
  constexpr int kDQ = D / 4;   // dQ columns per warp
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [BN][D]
  bf16* sV = sK + BN * D;                         // [BN][D]
  bf16* sQ = sV + BN * D;                         // [2][BM][D]
  bf16* sdO = sQ + 2 * BM * D;                    // [2][BM][D]
  bf16* sP = sdO + 2 * BM * D;                    // [BN][BM]  P^T
  bf16* sdS = sP + BN * BM;                       // [BN][BM]  dS^T
  float* sLse = reinterpret_cast<float*>(sdS + BN * BM);  // [2][BM], lse · log2 e
  float* sDelta = sLse + 2 * BM;                           // [2][BM]
  float* sDm = sDelta + 2 * BM;                            // [BN] dmask partials of qc = 1

  const int T = p.T, H = p.H, Hkv = p.Hkv, G = H / Hkv;
  const int nt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;  // grid (key tiles, Hkv, B)
  const int k0 = nt * BN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int kr = warp % 4, qc = warp / 4;
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
    // lse2 (= lse · log2 e) and Delta rows of the tile, asynchronously like the tiles (zero past T)
    for (int i = tid; i < 2 * BM; i += NT) {
      const int t = mt * BM + (i % BM);
      const long r = (static_cast<long>(b) * H + h) * p.stats_stride + t;
      const float* src = i < BM ? p.lse2 : p.delta;
      cp_async4((i < BM ? sLse : sDelta) + stage * BM + (i % BM), t < T ? src + r : src, t < T);
    }
  };

  load_tile<BN, D, NT>(sK, kb, k0, T, kstride);
  load_tile<BN, D, NT>(sV, vb, k0, T, kstride);
  load_q(0, 0);
  cp_async_commit();

  // this thread's key rows in the score tiles: kw0 + 16 mb + 8 hh + lane / 4
  const int kw0 = k0 + kr * 32;
  float mk[2][2];
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int key = kw0 + mb * 16 + hh * 8 + lane / 4;
      mk[mb][hh] = (p.mask && key < T) ? p.mask[(static_cast<long>(b) * T + key) * Hkv + hk] * kLog2e : 0.f;
    }
  float dk[2][kDV / 8][4], dv[2][kDV / 8][4];
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int i = 0; i < kDV / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mb][i][e] = dv[mb][i][e] = 0.f;
  float dm[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  const uint32_t offA = lane_off_a<D>(lane), offB = lane_off_b<D>(lane);
  const uint32_t offAs = lane_off_a<BM>(lane), offBs = lane_off_b<BM>(lane);
  const uint32_t uK = smem_u32(sK), uV = smem_u32(sV), uP = smem_u32(sP), udS = smem_u32(sdS);

  for (int it = 0; it < iters; ++it) {
    const int stage = it & 1;
    if (it + 1 < iters) load_q(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int g = it / n_m, mt = m_first + it % n_m;
    const int h = hk * G + g;
    const int qbase = mt * BM;
    const int qw0 = qbase + qc * 32;  // first query of this warp's score tile
    const uint32_t uQ = smem_u32(sQ) + stage * (BM * D * 2);
    const uint32_t udO = smem_u32(sdO) + stage * (BM * D * 2);
    const float* tL = sLse + stage * BM + qc * 32;
    const float* tD = sDelta + stage * BM + qc * 32;

    if (kw0 > qw0 + 31) {
      // every key of the warp's block comes after every query of its tile: P = dS = 0
      for (int i = lane; i < 32 * 16; i += 32) {  // 32 rows x 16 bf16 pairs
        const int r = kr * 32 + i / 16, c = qc * 32 + (i % 16) * 2;
        *reinterpret_cast<uint32_t*>(sP + swz<BM>(r, c / 8) + (c % 8)) = 0u;
        *reinterpret_cast<uint32_t*>(sdS + swz<BM>(r, c / 8) + (c % 8)) = 0u;
      }
    } else {
      // S^T = K Q^T and dP^T = V dO^T for 32 keys x 32 queries
      float s[2][4][4], dpt[2][4][4];
#pragma unroll
      for (int mb = 0; mb < 2; ++mb)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mb][i][e] = dpt[mb][i][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[2][4], bq[2][4];
#pragma unroll
        for (int mb = 0; mb < 2; ++mb) {
          ldsm_x4(a[mb], frag<D>(uK, offA, kr * 32 + mb * 16, kk));
          if (kk == D / 16 - 1 && p.exclude_ctrl && (lane % 4) == 3) {  // drop channel D-1
            a[mb][2] &= 0x0000ffffu;
            a[mb][3] &= 0x0000ffffu;
          }
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) ldsm_x4(bq[np], frag<D>(uQ, offB, qc * 32 + np * 16, kk));
#pragma unroll
        for (int mb = 0; mb < 2; ++mb)
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            mma16816(s[mb][2 * np], a[mb], bq[np][0], bq[np][1]);
            mma16816(s[mb][2 * np + 1], a[mb], bq[np][2], bq[np][3]);
          }
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[2][4], bo[2][4];
#pragma unroll
        for (int mb = 0; mb < 2; ++mb) ldsm_x4(a[mb], frag<D>(uV, offA, kr * 32 + mb * 16, kk));
#pragma unroll
        for (int np = 0; np < 2; ++np) ldsm_x4(bo[np], frag<D>(udO, offB, qc * 32 + np * 16, kk));
#pragma unroll
        for (int mb = 0; mb < 2; ++mb)
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            mma16816(dpt[mb][2 * np], a[mb], bo[np][0], bo[np][1]);
            mma16816(dpt[mb][2 * np + 1], a[mb], bo[np][2], bo[np][3]);
          }
      }
      // P^T = exp(s - lse), dS^T = P^T (dP^T - Delta), dmask; branch-free, tests skipped on
      // interior tiles (all of the warp's queries after all of its keys, none past T)
      auto softmax_grad = [&](auto interior_tag) {
        constexpr bool kInterior = decltype(interior_tag)::value;
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
          const float2 lq = *reinterpret_cast<const float2*>(tL + nb * 8 + 2 * (lane % 4));
          const float2 dq2 = *reinterpret_cast<const float2*>(tD + nb * 8 + 2 * (lane % 4));
#pragma unroll
          for (int mb = 0; mb < 2; ++mb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float l = (e & 1) ? lq.y : lq.x, dl = (e & 1) ? dq2.y : dq2.x;
              const int hh = e >> 1;
              float pv;
              bool before = true;
              if constexpr (kInterior) {
                pv = ex2(fmaf(s[mb][nb][e], p.scale_log2, mk[mb][hh] - l));
              } else {
                const int qrow = qw0 + nb * 8 + 2 * (lane % 4) + (e & 1);
                const int key = kw0 + mb * 16 + hh * 8 + lane / 4;
                before = qrow - key > p.window;
                const float x = ex2(fmaf(s[mb][nb][e], p.scale_log2, (before ? mk[mb][hh] : 0.f) - l));
                pv = (qrow >= key && qrow < T) ? x : 0.f;
              }
              const float ds = pv * (dpt[mb][nb][e] - dl);
              s[mb][nb][e] = pv;
              dpt[mb][nb][e] = ds;
              dm[mb][hh] += before ? ds : 0.f;
            }
        }
      };
      if (qw0 > kw0 + 31 + p.window && qbase + BM <= T)
        softmax_grad(std::true_type{});
      else
        softmax_grad(std::false_type{});
#pragma unroll
      for (int mb = 0; mb < 2; ++mb)
#pragma unroll
        for (int nb = 0; nb < 4; ++nb)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int r = kr * 32 + mb * 16 + hh * 8 + lane / 4;
            const int c = qc * 32 + nb * 8 + 2 * (lane % 4);
            const int o = swz<BM>(r, c / 8) + (c % 8);
            *reinterpret_cast<uint32_t*>(sP + o) = pack_bf16(s[mb][nb][2 * hh], s[mb][nb][2 * hh + 1]);
            *reinterpret_cast<uint32_t*>(sdS + o) = pack_bf16(dpt[mb][nb][2 * hh], dpt[mb][nb][2 * hh + 1]);
          }
    }
    __syncthreads();  // P^T and dS^T of the whole tile are in shared memory

    // dV += P^T dO and dK += dS^T Q for keys kr*32 + [0, 32), columns qc*kDV + [0, kDV)
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[2][4], as[2][4];
#pragma unroll
      for (int mb = 0; mb < 2; ++mb) {
        ldsm_x4(ap[mb], frag<BM>(uP, offAs, kr * 32 + mb * 16, kk));
        ldsm_x4(as[mb], frag<BM>(udS, offAs, kr * 32 + mb * 16, kk));
      }
#pragma unroll
      for (int dp = 0; dp < kDV / 16; ++dp) {
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, frag<D>(udO, offA, kk * 16, qc * (kDV / 16) + dp));
        ldsm_x4_t(bq, frag<D>(uQ, offA, kk * 16, qc * (kDV / 16) + dp));
#pragma unroll
        for (int mb = 0; mb < 2; ++mb) {
          mma16816(dv[mb][2 * dp], ap[mb], bo[0], bo[1]);
          mma16816(dv[mb][2 * dp + 1], ap[mb], bo[2], bo[3]);
          mma16816(dk[mb][2 * dp], as[mb], bq[0], bq[1]);
          mma16816(dk[mb][2 * dp + 1], as[mb], bq[2], bq[3]);
        }
      }
    }
    // dQ = dS K for query rows (warp % 2)*32 + [0, 32), columns (warp / 2)*kDQ + [0, kDQ)
    {
      const int qr0 = (warp % 2) * 32, cg = (warp / 2) * kDQ;
      float acc[2][kDQ / 8][4];
#pragma unroll
      for (int mb = 0; mb < 2; ++mb)
#pragma unroll
        for (int i = 0; i < kDQ / 8; ++i) acc[mb][i][0] = acc[mb][i][1] = acc[mb][i][2] = acc[mb][i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mb = 0; mb < 2; ++mb) ldsm_x4_t(a[mb], frag<BM>(udS, offBs, kk * 16, (qr0 + mb * 16) / 16));
#pragma unroll
        for (int dp = 0; dp < kDQ / 16; ++dp) {
          uint32_t bb[4];
          ldsm_x4_t(bb, frag<D>(uK, offA, kk * 16, cg / 16 + dp));
#pragma unroll
          for (int mb = 0; mb < 2; ++mb) {
            mma16816(acc[mb][2 * dp], a[mb], bb[0], bb[1]);
            mma16816(acc[mb][2 * dp + 1], a[mb], bb[2], bb[3]);
          }
        }
      }
#pragma unroll
      for (int mb = 0; mb < 2; ++mb)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int qrow = qbase + qr0 + mb * 16 + hh * 8 + lane / 4;
          if (qrow >= T) continue;
          float* dst = p.dq_acc + (static_cast<long>(b) * T + qrow) * qstride + static_cast<long>(h) * D + cg;
#pragma unroll
          for (int nb = 0; nb < kDQ / 8; ++nb) {
            const int c = nb * 8 + 2 * (lane % 4);
            const float v0 = acc[mb][nb][2 * hh] * p.scale;
            float v1 = acc[mb][nb][2 * hh + 1] * p.scale;
            if (p.exclude_ctrl && cg + c + 1 == D - 1) v1 = 0.f;
            atomicAdd(reinterpret_cast<float2*>(dst + c), make_float2(v0, v1));
          }
        }
    }
    __syncthreads();  // the next prefetch overwrites this stage; sP/sdS are rewritten
  }

  // dmask: quad sums, then the two query halves (qc = 0, 1) of each key block are combined
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float v = dm[mb][hh];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      dm[mb][hh] = v;
      if (qc == 1 && (lane % 4) == 0) sDm[kr * 32 + mb * 16 + hh * 8 + lane / 4] = v;
    }
  __syncthreads();
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int kl = kr * 32 + mb * 16 + hh * 8 + lane / 4;
      const int key = k0 + kl;
      if (key >= T) continue;
      if (qc == 0 && (lane % 4) == 0 && p.dmask) {
        float& dst = p.dmask[(static_cast<long>(b) * T + key) * Hkv + hk];
        dst = (p.accumulate ? dst : 0.f) + (dm[mb][hh] + sDm[kl]);
      }
      const long off = (static_cast<long>(b) * T + key) * kstride + static_cast<long>(hk) * D + qc * kDV;
#pragma unroll
      for (int nb = 0; nb < kDV / 8; ++nb) {
        const int c = nb * 8 + 2 * (lane % 4);
        const float k0v = dk[mb][nb][2 * hh] * p.scale;
        float k1v = dk[mb][nb][2 * hh + 1] * p.scale;
        if (p.exclude_ctrl && qc * kDV + c + 1 == D - 1) k1v = 0.f;
        __nv_bfloat162* pk = reinterpret_cast<__nv_bfloat162*>(p.dk + off + c);
        const float2 ok = p.accumulate ? __bfloat1622float2(*pk) : make_float2(0.f, 0.f);
        *pk = __floats2bfloat162_rn(ok.x + k0v, ok.y + k1v);
        __nv_bfloat162* pv = reinterpret_cast<__nv_bfloat162*>(p.dv + off + c);
        const float2 ov = p.accumulate ? __bfloat1622float2(*pv) : make_float2(0.f, 0.f);
        *pv = __floats2bfloat162_rn(ov.x + dv[mb][nb][2 * hh], ov.y + dv[mb][nb][2 * hh + 1]);
      }
    }
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  DMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// Tile configurations (measured alternatives in bench/RESULTS.md: 32-key forward tiles and 4-warp
// backward CTAs were slower).
template <int D>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  constexpr int BN = 64, NW = 4, MB = 2, BM = 16 * MB * NW;
  const size_t smem = sizeof(bf16) * (BM * D + 4 * BN * D) + sizeof(float) * 2 * BN;
  auto kernel = attn_fwd_kernel<D, BN, NW, MB>;
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
  constexpr int BM = 64, BN = 128, NT = 256;
  const size_t smem =
      sizeof(bf16) * (2 * BN * D + 4 * BM * D + 2 * BN * BM) + sizeof(float) * (4 * BM + BN);
  auto kernel = attn_bwd_kernel<D>;
  static bool configured = false;
  if (!configured) {
    set_smem(kernel, smem);
    configured = true;
  }
  dim3 grid(ceil_div(p.T, BN), p.Hkv, p.B);
  kernel<<<grid, NT, smem, stream>>>(p);
  DMC_CUDA_CHECK_LAUNCH();
}

// The forward takes head dims 32 (the portable kernel only: the Hopper one's tiles are 64
// channels wide), 64 and 128; the backward, which only training runs, 64 and 128.
void check_shape(int T, int H, int Hkv, int D, bool forward) {
  if (D != 64 && D != 128 && !(forward && D == 32)) {
    std::fprintf(stderr, "dmc_attention: head dim %d unsupported (%s)\n", D,
                 forward ? "32, 64 or 128" : "64 or 128");
    std::abort();
  }
  if (Hkv <= 0 || H % Hkv != 0) {
    std::fprintf(stderr, "dmc_attention: H=%d is not a multiple of Hkv=%d\n", H, Hkv);
    std::abort();
  }
}

// kAuto's choice of device kernel, made once per process: the Hopper kernels on their persistent
// schedules where they run (the 1.36B step 1.6-2.1% faster than on the grid schedules on an H100,
// bench/RESULTS.md entry 27), unless DMC_ATTENTION_KERNEL=mma_sync keeps the portable ones or
// =sm90_grid takes the grid schedules.
AttentionKernel auto_kernel() {
  static const AttentionKernel chosen = [] {
    const char* env = std::getenv("DMC_ATTENTION_KERNEL");
    const std::string name = env ? env : "";
    if (name == "mma_sync") return AttentionKernel::kMmaSync;
    const bool grid = name == "sm90_grid";
    if (!name.empty() && name != "auto" && !grid) {
      std::fprintf(stderr,
                   "DMC_ATTENTION_KERNEL=%s: unknown value (auto, mma_sync or sm90_grid)\n", env);
      std::abort();
    }
    if (!device_is_sm90()) return AttentionKernel::kMmaSync;
    return grid ? AttentionKernel::kSm90 : AttentionKernel::kSm90Persistent;
  }();
  return chosen;
}

// The forward that runs: kAuto is auto_kernel() at head dims 64 and 128 (the Hopper forward takes
// no other), the portable kernel at 32. Measured on an H100 (bench/RESULTS.md, entries 35 and
// 38): the Hopper forward 1.4-1.8x the portable one at head dim 128 and 1.4x at 64; the
// persistent schedule 5-17% less time than the grid one at T 1024-4096 and 5% less at T 8192,
// each timed from a GPU at rest (entry 35's grid lead at T 8192 came from the order of the
// columns: the persistent one, timed after it, ran under the power cap's lower clocks).
AttentionKernel resolve_forward_kernel(AttentionKernel kernel, int D) {
  if (kernel != AttentionKernel::kAuto) return kernel;
  if (D != 64 && D != 128) return AttentionKernel::kMmaSync;
  return auto_kernel();
}
// The backward that runs: kAuto is auto_kernel() at both head dims.
AttentionKernel resolve_backward_kernel(AttentionKernel kernel) {
  return kernel == AttentionKernel::kAuto ? auto_kernel() : kernel;
}

}  // namespace

void dmc_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                           const float* mask, int B, int T, int H, int Hkv, int D,
                           bool exclude_ctrl, float scale, cudaStream_t stream, int mask_window,
                           AttentionKernel kernel) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  check_shape(T, H, Hkv, D, /*forward=*/true);
  const AttentionKernel chosen = resolve_forward_kernel(kernel, D);
  if (chosen != AttentionKernel::kMmaSync) {
    dmc_attention_forward_sm90(out, lse, q, k, v, mask, B, T, H, Hkv, D, exclude_ctrl, scale,
                               stream, mask_window, chosen == AttentionKernel::kSm90Persistent);
    return;
  }
  FwdParams p{q, k, v, mask, out, lse, B, T, H, Hkv, scale * kLog2e, exclude_ctrl, mask_window};
  if (D == 32)
    launch_fwd<32>(p, stream);
  else if (D == 64)
    launch_fwd<64>(p, stream);
  else
    launch_fwd<128>(p, stream);
}

void dmc_attention_backward(bf16* dq, bf16* dk, bf16* dv, float* dmask, const bf16* dout,
                            const bf16* q, const bf16* k, const bf16* v, const float* mask,
                            const bf16* out, const float* lse, int B, int T, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale, bool accumulate, cudaStream_t stream,
                            int mask_window, AttentionKernel kernel) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  check_shape(T, H, Hkv, D, /*forward=*/false);
  const long nq = static_cast<long>(B) * T * H * D;
  const long rows = static_cast<long>(B) * T * H;
  const int stats_stride = attention_stats_stride(T);
  const long stats_size = static_cast<long>(B) * H * stats_stride;
  float* dq_acc = static_cast<float*>(scratch(kScratchAttentionDq, sizeof(float) * nq));
  float* stats =
      static_cast<float*>(scratch(kScratchAttentionStats, sizeof(float) * 2 * stats_size));
  float* delta = stats;
  float* lse2 = stats + stats_size;
  // Summed by atomics (or TMA reduce-adds) from every key tile's CTA: it must start at zero.
  DMC_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, sizeof(float) * nq, stream));
  if (D == 64)
    attn_bwd_prepass<64><<<ceil_div(rows * 8, 256), 256, 0, stream>>>(delta, lse2, lse, dout, out, B,
                                                                      T, H, stats_stride);
  else
    attn_bwd_prepass<128><<<ceil_div(rows * 8, 256), 256, 0, stream>>>(delta, lse2, lse, dout, out,
                                                                       B, T, H, stats_stride);
  DMC_CUDA_CHECK_LAUNCH();
  const AttentionKernel chosen = resolve_backward_kernel(kernel);
  if (chosen != AttentionKernel::kMmaSync) {
    dmc_attention_backward_sm90(dq_acc, dk, dv, dmask, dout, q, k, v, mask, lse2, delta, B, T, H,
                                Hkv, D, exclude_ctrl, scale, accumulate, stream, mask_window,
                                chosen == AttentionKernel::kSm90Persistent);
  } else {
    BwdParams p{q,  k,  v,  mask,  dout, lse2, delta, stats_stride, dq_acc, dk, dv, dmask, B, T, H,
                Hkv, scale, scale * kLog2e, exclude_ctrl, mask_window, accumulate};
    if (D == 64)
      launch_bwd<64>(p, stream);
    else
      launch_bwd<128>(p, stream);
  }
  attn_bwd_dq_out<<<ceil_div(nq / 8, 256), 256, 0, stream>>>(dq, dq_acc, nq, accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
