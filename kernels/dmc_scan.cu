// DMC windowed partial accumulation on the GPU (spec: kernels/dmc_scan.h), fp32 arithmetic.
// Keys and values share alpha, omega and denom, so the _kv entry points take both (kNV = 2): a
// staged row holds a token's key channels then its value channels, the window coefficients are
// formed once for both, and the coefficient gradient dc sums both tensors' terms.
//
// The scan is a banded matrix product per (b, KV head): xhat = diag(1/denom) · C · x with
// C[t, j] = c[t, j] nonzero for t - w < j <= t. It moves little data per token and was bound by
// re-reading each row w times; here every CTA takes a tile of kTile tokens of one (b, h), stages
// the rows it needs in shared memory once (cp.async, kChunk rows at a time: the tile and the
// window's rows before it, in one chunk while w <= kChunk - kTile + 1 = 17), and every staged row
// is read from shared memory by the few threads whose output rows its window reaches.
//
// Forward: "walker" threads, one per output row t, walk the row's window from j = t down with a
// running product of alphas and write c[t, j] into a coefficient block coef[j][t] (zero outside
// the band), summing denom[t] on the way. Then each thread accumulates kRows consecutive output
// rows × 8 channels: per staged row one 16-byte load of the row and one of 4 coefficients, 32
// FMAs. Windows longer than a chunk take more chunks, walked downwards, the walkers carrying their
// running products from one to the next.
//
// Backward, with dy = dxhat:
//   dc[t, j] = (dy[t]·x[j] - dy[t]·xhat[t]) / denom[t]                (summed over k and v)
//   dx[j]    = sum_{t=j}^{j+w-1} c[t, j] / denom[t] · dy[t]
//   domega[j] += sum_t dc[t, j] · prod_{m=j+1..t} alpha[m]
//   dalpha[m] += sum_{t>=m} prod_{m+1..t} alpha · sum_{j<m} dc[t, j] omega[j] prod_{j+1..m-1} alpha
// The tiled kernel stages dy for the tile and the w-1 rows after it and x for the tile and the
// w-1 rows before it. dx comes first: the forward's accumulation transposed (walkers per output
// row j walk t upwards), stored before dc needs the registers. dc is a band of dy · xᵀ, a matrix
// product over the 2D channels of k and v: tensor cores (mma.sync m16n8k16, bf16 operands as
// stored, fp32 accumulation) compute it in 16 × 16 blocks along the band, and it goes to scratch
// ([b, h, k = t - j, t], slot 3). A second, small kernel gathers the gate gradients from it, one
// thread per token m, reading coalesced along m; there is no division by alpha (hard decisions
// make it exactly 0) and no atomics.
//
// Limits: 2·D (k and v) or D at most 512 channels (D <= 256 for the pair); the gate kernel stages
// alpha and omega for 256 tokens and the window on both sides, so min(w, T) must stay under about
// 14k tokens.
#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr int kTile = 64;                // tokens whose outputs one CTA writes
constexpr int kChunk = 80;               // rows staged at once: the tile and 16 rows of window
constexpr int kRows = 4;                 // output rows of one thread (one float4 of coefficients)
constexpr int kCoefStride = kTile + 4;   // 16-byte rows; walkers' writes fall into distinct banks
constexpr int kMaxWidth = 512;           // channels of a staged row (k and v)
constexpr int kPassBlocks = 2;           // n8 blocks of dc per mma work item
constexpr int kGateThreads = 256;
static_assert(kChunk >= kTile && kChunk % 16 == 0 && kTile % 16 == 0, "mma tiles");

struct Shape {
  int T, Hkv, D, window;  // window clamped to T (a longer one changes nothing)
  int width;              // channels of a staged row: kNV · D
  int stride;             // bf16 per staged row: width rounded up to 16 (the mma's k), plus 8
  int groups;             // 8-channel groups of a staged row
};

// Row stride: rows (2·width + 16 bytes apart) start in 8 different 16-byte bank groups, so the 8
// row addresses of an ldmatrix are conflict-free.
inline int row_stride(int width) { return (width + 15) / 16 * 16 + 8; }

size_t forward_smem(int stride) {
  return sizeof(bf16) * kChunk * stride + sizeof(float) * (kChunk * kCoefStride + 2 * kChunk +
                                                           2 * kTile);
}
size_t backward_smem(int stride) {
  return sizeof(bf16) * 2 * kChunk * stride +
         sizeof(float) * (kChunk * kCoefStride + 2 * kChunk + 3 * kTile);
}

// Column col of a staged row is channel col % D of x (col < D) or y: these move the 8 columns
// from col on between a tensor in global memory and registers (kVec: one 16-byte access each).
template <int kNV, bool kVec>
__device__ __forceinline__ void load_group(float (&v)[8], const bf16* x, const bf16* y, long s,
                                           int col, int D) {
  if (kVec) {
    unpack8(v, *reinterpret_cast<const uint4*>(kNV == 2 && col >= D ? y + s * D + col - D
                                                                   : x + s * D + col));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = col + i;
      v[i] = c < kNV * D ? bf(c < D ? x[s * D + c] : y[s * D + c - D]) : 0.f;
    }
  }
}

template <int kNV, bool kVec>
__device__ __forceinline__ void store_group(bf16* x, bf16* y, long s, int col, int D,
                                            float (&v)[8], bool accumulate) {
  if (kVec) {
    uint4* p =
        reinterpret_cast<uint4*>(kNV == 2 && col >= D ? y + s * D + col - D : x + s * D + col);
    if (accumulate) {
      float old[8];
      unpack8(old, *p);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += old[i];
    }
    *p = pack8(v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = col + i;
      if (c < kNV * D) {
        bf16* p = c < D ? x + s * D + c : y + s * D + c - D;
        *p = tobf(accumulate ? bf(*p) + v[i] : v[i]);
      }
    }
  }
}

// Stages kChunk rows, tokens first .. first + kChunk - 1 of the (b, h) whose token t has scalar
// index base + t·Hkv; rows outside [0, T) and the padding columns are zeros. Vector rows go by
// cp.async (the caller commits and waits).
template <int kNV, bool kVec>
__device__ void stage_rows(bf16* rows, const bf16* x, const bf16* y, long base, int first,
                           const Shape& sh) {
  const int padded = sh.stride - 8, per_row = padded / 8;
  for (int i = threadIdx.x; i < kChunk * per_row; i += blockDim.x) {
    const int r = i / per_row, col = (i - r * per_row) * 8, t = first + r;
    const bool valid = t >= 0 && t < sh.T;
    bf16* dst = rows + r * sh.stride + col;
    if (col >= sh.width) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else if (kVec) {
      const long s = base + static_cast<long>(valid ? t : 0) * sh.Hkv;
      cp_async16(dst, kNV == 2 && col >= sh.D ? y + s * sh.D + col - sh.D : x + s * sh.D + col,
                 valid);
    } else {
      float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (valid) load_group<kNV, false>(v, x, y, base + static_cast<long>(t) * sh.Hkv, col, sh.D);
      *reinterpret_cast<uint4*>(dst) = pack8(v);
    }
  }
}

// Per-token scalars of the staged rows (0 outside [0, T)); `inverse` stores 1/a.
__device__ void stage_scalars(float* out, const float* a, long base, int first, const Shape& sh,
                              bool inverse) {
  for (int r = threadIdx.x; r < kChunk; r += blockDim.x) {
    const int t = first + r;
    float v = 0.f;
    if (t >= 0 && t < sh.T) {
      v = a[base + static_cast<long>(t) * sh.Hkv];
      if (inverse) v = 1.f / v;
    }
    out[r] = v;
  }
}

// A chunk for the walkers: its rows, two scalars per token (the second inverted if asked), the
// coefficient block cleared; returns when all of it is in place.
template <int kNV, bool kVec>
__device__ void stage_chunk(bf16* rows, const bf16* x, const bf16* y, float* s1, const float* a1,
                            float* s2, const float* a2, bool invert2, float* coef, long base,
                            int lo, const Shape& sh) {
  stage_rows<kNV, kVec>(rows, x, y, base, lo, sh);
  cp_async_commit();
  stage_scalars(s1, a1, base, lo, sh, false);
  stage_scalars(s2, a2, base, lo, sh, invert2);
  for (int i = threadIdx.x; i < kChunk * kCoefStride / 4; i += blockDim.x)
    reinterpret_cast<float4*>(coef)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  cp_async_wait<0>();
  __syncthreads();
}

// acc[i] += sum over staged rows jj in [lo, hi] of coef[jj][r0 + i] · rows[jj][col .. col+7].
__device__ __forceinline__ void accumulate(float (&acc)[kRows][8], const bf16* rows, int stride,
                                           const float* coef, int r0, int col, int lo, int hi) {
  static_assert(kRows == 4, "one 16-byte load of coefficients per staged row");
  const uint32_t row_at = smem_u32(rows + col), coef_at = smem_u32(coef + r0);
  for (int jj = lo; jj <= hi; ++jj) {
    float v[8];
    unpack8(v, lds128(row_at + jj * stride * sizeof(bf16)));
    const uint4 c4 = lds128(coef_at + jj * kCoefStride * sizeof(float));
    const float c[kRows] = {__uint_as_float(c4.x), __uint_as_float(c4.y), __uint_as_float(c4.z),
                            __uint_as_float(c4.w)};
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[i][k] = fmaf(c[i], v[k], acc[i][k]);
  }
}

// One CTA: tokens [t0, t0 + kTile) of (b = blockIdx.z, h = blockIdx.y).
template <int kNV, bool kVec>
__global__ void __launch_bounds__(1024) scan_forward_kernel(bf16* xhat, bf16* yhat, float* denom,
                                                            const bf16* x, const bf16* y,
                                                            const float* alpha,
                                                            const float* omega, Shape sh) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* rows = reinterpret_cast<bf16*>(smem);
  float* coef = reinterpret_cast<float*>(rows + kChunk * sh.stride);  // [staged row][output row]
  float* s_alpha = coef + kChunk * kCoefStride;
  float* s_omega = s_alpha + kChunk;
  float* carry = s_omega + kChunk;  // walker state between chunks: prod alpha, denom so far
  float* den = carry + kTile;

  const int t0 = blockIdx.x * kTile, w = sh.window;
  const long base = static_cast<long>(blockIdx.z) * sh.T * sh.Hkv + blockIdx.y;
  const int r0 = threadIdx.x / sh.groups * kRows, col = threadIdx.x % sh.groups * 8;
  const bool has_item = r0 < kTile;
  float acc[kRows][8] = {};

  // Chunks from the tile's end downwards, while they reach the first token of any window.
  const int jmin = max(0, t0 - w + 1);
  for (int lo = t0 + kTile - kChunk; lo + kChunk > jmin; lo -= kChunk) {
    const bool first = lo == t0 + kTile - kChunk;
    if (!first) __syncthreads();  // the last chunk's rows and coefficients are consumed
    stage_chunk<kNV, kVec>(rows, x, y, s_alpha, alpha, s_omega, omega, false, coef, base, lo, sh);
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
      const int t = t0 + r;
      if (t >= sh.T) continue;
      float prod = first ? 1.f : carry[r], sum = first ? 0.f : den[r];  // prod_{j+1..t} alpha
      for (int j = min(t, lo + kChunk - 1); j >= max(jmin, max(lo, t - w + 1)); --j) {
        const float c = s_omega[j - lo] * prod;
        sum += c;
        coef[(j - lo) * kCoefStride + r] = c;
        prod *= s_alpha[j - lo];
      }
      carry[r] = prod;
      den[r] = sum;
    }
    __syncthreads();
    if (has_item)
      accumulate(acc, rows, sh.stride, coef, r0, col, max(0, t0 + r0 - w + 1 - lo),
                 min(kChunk - 1, t0 + r0 + kRows - 1 - lo));
  }
  if (has_item)
    for (int i = 0; i < kRows; ++i) {
      const int t = t0 + r0 + i;
      if (t >= sh.T) break;
      const float inv = 1.f / den[r0 + i];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[i][k] *= inv;
      store_group<kNV, kVec>(xhat, yhat, base + static_cast<long>(t) * sh.Hkv, col, sh.D, acc[i],
                             false);
    }
  if (denom)
    for (int r = threadIdx.x; r < kTile && t0 + r < sh.T; r += blockDim.x)
      denom[base + static_cast<long>(t0 + r) * sh.Hkv] = den[r];
}

// dc for the tile's tokens t against the staged x rows lo .. lo + kChunk - 1, on tensor cores.
// Work items: 16 tokens (one m16 block, rows of dy_rows) × kPassBlocks n8 blocks of the band,
// spread over the warps; each writes the band's entries of its 16 × 16 block to dc.
__device__ void coefficient_grads(float* dc, const bf16* dy_rows, const bf16* x_rows, int lo,
                                  const float* self_dot, const float* inv_den, int t0, long bh,
                                  const Shape& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  const int w = sh.window, ksteps = (sh.stride - 8) / 16;
  const uint32_t a_base = smem_u32(dy_rows), b_base = smem_u32(x_rows);
  const int a_row = lane % 8 + 8 * (lane / 8 % 2), a_col = 8 * (lane / 16);  // ldmatrix lanes
  const int b_row = lane % 8 + 8 * (lane / 16), b_col = 8 * (lane / 8 % 2);
  int item = 0;
  for (int mb = 0; mb < kTile / 16 && t0 + 16 * mb < sh.T; ++mb) {
    const int tm = t0 + 16 * mb;
    const int jj_lo = max(max(0, -lo), tm - w + 1 - lo), jj_hi = min(kChunk - 1, tm + 15 - lo);
    if (jj_lo > jj_hi) continue;
    const int nb_hi = jj_hi / 8;
    for (int nb0 = jj_lo / 8; nb0 <= nb_hi; nb0 += kPassBlocks, ++item) {
      if (item % nwarps != warp) continue;
      float acc[kPassBlocks][4] = {};
      // the second block's rows may lie past the chunk (nb0 == nb_hi): clamp, its sums unused
      const int brow = min(kChunk - 1, 8 * nb0 + b_row);
      for (int ks = 0; ks < ksteps; ++ks) {
        uint32_t a[4], bb[4];
        ldsm_x4(a, a_base + 2 * ((16 * mb + a_row) * sh.stride + 16 * ks + a_col));
        ldsm_x4(bb, b_base + 2 * (brow * sh.stride + 16 * ks + b_col));
        mma16816(acc[0], a, bb[0], bb[1]);
        mma16816(acc[1], a, bb[2], bb[3]);
      }
      for (int q = 0; q < kPassBlocks && nb0 + q <= nb_hi; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 16 * mb + lane / 4 + 8 * (e / 2), t = t0 + r;
          const int j = lo + 8 * (nb0 + q) + 2 * (lane % 4) + e % 2, k = t - j;
          if (t < sh.T && j >= 0 && k >= 0 && k < w)
            dc[(bh * w + k) * sh.T + t] = (acc[q][e] - self_dot[r]) * inv_den[r];
        }
    }
  }
}

// One CTA: dx for tokens j in [t0, t0 + kTile) and dc for tokens t in the same range (dc null:
// no gate gradients wanted; dx null: no dx).
template <int kNV, bool kVec>
__global__ void __launch_bounds__(1024) scan_backward_kernel(
    bf16* dx, bf16* dy, float* dc, const bf16* gx, const bf16* gy, const bf16* x, const bf16* y,
    const bf16* xhat, const bf16* yhat, const float* alpha, const float* omega, const float* denom,
    Shape sh, bool accumulate_dx) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* g_rows = reinterpret_cast<bf16*>(smem);  // gx/gy rows from t0 on
  bf16* x_rows = g_rows + kChunk * sh.stride;    // x/y rows up to t0 + kTile
  float* coef = reinterpret_cast<float*>(x_rows + kChunk * sh.stride);  // [row t][output row j]
  float* s_alpha = coef + kChunk * kCoefStride;
  float* s_inv_den = s_alpha + kChunk;
  float* carry = s_inv_den + kChunk;  // dx walkers' prod_{j+1..t} alpha between chunks
  float* self_dot = carry + kTile;    // gx[t]·xhat[t] + gy[t]·yhat[t]
  float* inv_den = self_dot + kTile;  // 1 / denom[t] of the tile's tokens

  const int t0 = blockIdx.x * kTile, w = sh.window;
  const long bh = static_cast<long>(blockIdx.z) * sh.Hkv + blockIdx.y;
  const long base = static_cast<long>(blockIdx.z) * sh.T * sh.Hkv + blockIdx.y;
  const int r0 = threadIdx.x / sh.groups * kRows, col = threadIdx.x % sh.groups * 8;
  const bool has_item = dx && r0 < kTile;
  float acc[kRows][8] = {};

  // dx: walkers for output rows j = t0 + r over the gradient rows lo .. lo + kChunk - 1.
  auto walk = [&](int lo, bool first) {
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
      const int j = t0 + r;
      if (j >= sh.T) continue;
      const float om = omega[base + static_cast<long>(j) * sh.Hkv];
      float prod = first ? 1.f : carry[r];
      const int t_hi = min(min(j + w - 1, sh.T - 1), lo + kChunk - 1);
      for (int t = max(j, lo); t <= t_hi; ++t) {
        if (t > j) prod *= s_alpha[t - lo];
        coef[(t - lo) * kCoefStride + r] = om * prod * s_inv_den[t - lo];
      }
      carry[r] = prod;
    }
  };
  auto accumulate_dx_rows = [&](int lo) {
    if (has_item)
      accumulate(acc, g_rows, sh.stride, coef, r0, col, max(0, t0 + r0 - lo),
                 min(kChunk - 1, t0 + r0 + kRows - 1 + w - 1 - lo));
  };

  // The first chunks: gradient rows [t0, t0 + kChunk), x rows [t0 + kTile - kChunk, t0 + kTile).
  const int x_lo = t0 + kTile - kChunk;
  if (dc) stage_rows<kNV, kVec>(x_rows, x, y, base, x_lo, sh);
  stage_chunk<kNV, kVec>(g_rows, gx, gy, s_alpha, alpha, s_inv_den, denom, true, coef, base, t0,
                         sh);
  if (dx) walk(t0, true);
  if (dc)
    for (int r = threadIdx.x / 32; r < kTile; r += blockDim.x / 32) {
      const int t = t0 + r;
      float sum = 0.f;
      if (t < sh.T)
        for (int col8 = threadIdx.x % 32 * 8; col8 < sh.width; col8 += 256) {
          float yv[8], gv[8];
          load_group<kNV, kVec>(yv, xhat, yhat, base + static_cast<long>(t) * sh.Hkv, col8, sh.D);
          unpack8(gv, lds128(smem_u32(g_rows + r * sh.stride + col8)));
#pragma unroll
          for (int i = 0; i < 8; ++i) sum = fmaf(gv[i], yv[i], sum);
        }
      sum = warp_sum(sum);
      if (threadIdx.x % 32 == 0) {
        self_dot[r] = sum;
        inv_den[r] = t < sh.T ? 1.f / denom[base + static_cast<long>(t) * sh.Hkv] : 0.f;
      }
    }
  __syncthreads();

  // dx first, so that its accumulators are stored before dc's mma fragments need registers.
  accumulate_dx_rows(t0);
  bool g_rows_replaced = false;
  if (dx)
    for (int lo = t0 + kChunk; lo < min(sh.T, t0 + kTile + w - 1); lo += kChunk) {
      __syncthreads();
      stage_chunk<kNV, kVec>(g_rows, gx, gy, s_alpha, alpha, s_inv_den, denom, true, coef, base,
                             lo, sh);
      walk(lo, false);
      __syncthreads();
      accumulate_dx_rows(lo);
      g_rows_replaced = true;
    }
  if (has_item)
    for (int i = 0; i < kRows; ++i) {
      const int j = t0 + r0 + i;
      if (j >= sh.T) break;
      store_group<kNV, kVec>(dx, dy, base + static_cast<long>(j) * sh.Hkv, col, sh.D, acc[i],
                             accumulate_dx);
    }
  if (!dc) return;

  // Staged rows replaced once every thread is done with them.
  auto restage = [&](bf16* rows, const bf16* a, const bf16* b, int lo) {
    __syncthreads();
    stage_rows<kNV, kVec>(rows, a, b, base, lo, sh);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  };
  if (g_rows_replaced) restage(g_rows, gx, gy, t0);
  coefficient_grads(dc, g_rows, x_rows, x_lo, self_dot, inv_den, t0, bh, sh);
  // Windows longer than a chunk: further x rows, downwards.
  for (int lo = x_lo - kChunk; lo + kChunk > max(0, t0 - w + 1); lo -= kChunk) {
    restage(x_rows, x, y, lo);
    coefficient_grads(dc, g_rows, x_rows, lo, self_dot, inv_den, t0, bh, sh);
  }
}

// One thread per token m of one (b, h), gathering from dc [b, h, k, t] (coalesced along m):
//   domega[m] += sum_{d=0}^{w-1} dc[t = m+d, k = d] · R_d,   R_d = prod_{m+1..m+d} alpha
//   dalpha[m] += sum_{d=0}^{w-2} R_d · sum_{e=1}^{w-1-d} dc[t = m+d, k = d+e] · omega[m-e] · L_e,
//                L_e = prod_{m-e+1..m-1} alpha
// (t <= T-1, m - e >= 0). alpha and omega of the tokens reached are staged in shared memory.
__global__ void __launch_bounds__(kGateThreads)
    scan_gates_kernel(float* dalpha, float* domega, const float* dc, const float* alpha,
                      const float* omega, int T, int Hkv, int w) {
  extern __shared__ float scalars[];
  const int m0 = blockIdx.x * kGateThreads;
  const long bh = static_cast<long>(blockIdx.z) * Hkv + blockIdx.y;
  const long base = static_cast<long>(blockIdx.z) * T * Hkv + blockIdx.y;
  const int lo = max(0, m0 - w + 1), n = min(T, m0 + kGateThreads + w - 1) - lo;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    scalars[i] = alpha[base + static_cast<long>(lo + i) * Hkv];
    scalars[n + i] = omega[base + static_cast<long>(lo + i) * Hkv];
  }
  auto a = [&](int t) { return scalars[t - lo]; };  // tokens lo .. lo + n - 1
  auto o = [&](int t) { return scalars[n + t - lo]; };
  __syncthreads();
  const int m = m0 + threadIdx.x;
  if (m >= T) return;
  const float* d_c = dc + bh * w * T;  // d_c[k · T + t]
  const int dmax = min(w - 1, T - 1 - m);
  if (domega) {
    float sum = 0.f, R = 1.f;
    for (int d = 0; d <= dmax; ++d) {
      if (d > 0) R *= a(m + d);
      sum = fmaf(d_c[d * T + m + d], R, sum);
    }
    domega[base + static_cast<long>(m) * Hkv] += sum;
  }
  if (dalpha) {
    float sum = 0.f, R = 1.f;
    for (int d = 0; d <= min(dmax, w - 2); ++d) {
      if (d > 0) R *= a(m + d);
      float inner = 0.f, L = 1.f;
      for (int e = 1; e <= min(w - 1 - d, m); ++e) {
        inner = fmaf(d_c[(d + e) * T + m + d], o(m - e) * L, inner);
        L *= a(m - e);
      }
      sum = fmaf(R, inner, sum);
    }
    dalpha[base + static_cast<long>(m) * Hkv] += sum;
  }
}

Shape make_shape(int nv, int T, int Hkv, int D, int window) {
  Shape sh{T, Hkv, D, std::min(window, T), nv * D, row_stride(nv * D), (nv * D + 7) / 8};
  if (sh.width > kMaxWidth) {
    std::fprintf(stderr, "dmc_scan: %d channels per token (head dim %d) exceed %d\n", sh.width, D,
                 kMaxWidth);
    std::abort();
  }
  return sh;
}

// Output rows × channel groups, at least the walkers' kTile threads.
int block_threads(const Shape& sh) {
  const int items = kTile / kRows * sh.groups;
  return (std::max(items, kTile) + 31) / 32 * 32;
}

// Raises a kernel's dynamic shared memory limit once, to what the widest row needs.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  DMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <int kNV, bool kVec>
void launch_forward(bf16* xhat, bf16* yhat, float* denom, const bf16* x, const bf16* y,
                    const float* alpha, const float* omega, const Shape& sh, int B,
                    cudaStream_t stream) {
  static const bool configured =
      (allow_smem(scan_forward_kernel<kNV, kVec>, forward_smem(row_stride(kMaxWidth))), true);
  (void)configured;
  const dim3 grid(ceil_div(sh.T, kTile), sh.Hkv, B);
  scan_forward_kernel<kNV, kVec><<<grid, block_threads(sh), forward_smem(sh.stride), stream>>>(
      xhat, yhat, denom, x, y, alpha, omega, sh);
  DMC_CUDA_CHECK_LAUNCH();
}

template <int kNV, bool kVec>
void launch_backward(bf16* dx, bf16* dy, float* dc, const bf16* gx, const bf16* gy, const bf16* x,
                     const bf16* y, const bf16* xhat, const bf16* yhat, const float* alpha,
                     const float* omega, const float* denom, const Shape& sh, int B,
                     bool accumulate, cudaStream_t stream) {
  static const bool configured =
      (allow_smem(scan_backward_kernel<kNV, kVec>, backward_smem(row_stride(kMaxWidth))), true);
  (void)configured;
  const dim3 grid(ceil_div(sh.T, kTile), sh.Hkv, B);
  scan_backward_kernel<kNV, kVec><<<grid, block_threads(sh), backward_smem(sh.stride), stream>>>(
      dx, dy, dc, gx, gy, x, y, xhat, yhat, alpha, omega, denom, sh, accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

// The gate kernel's shared memory: alpha and omega of its tokens and the window on both sides.
size_t gate_staging_bytes(int T, int window) {
  return 2 * sizeof(float) * std::min<long>(T, kGateThreads + 2L * (std::min(window, T) - 1));
}

// The device's opt-in shared memory per block, granted to the gate kernel on the first call.
int gate_staging_limit() {
  static const int limit = [] {
    int dev = 0, optin = 0;
    DMC_CUDA_CHECK(cudaGetDevice(&dev));
    DMC_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    allow_smem(scan_gates_kernel, optin);
    return optin;
  }();
  return limit;
}

void launch_gates(float* dalpha, float* domega, const float* dc, const float* alpha,
                  const float* omega, const Shape& sh, int B, cudaStream_t stream) {
  const size_t bytes = gate_staging_bytes(sh.T, sh.window);
  if (bytes > static_cast<size_t>(gate_staging_limit())) {
    std::fprintf(stderr, "dmc_scan: window %d too long for the gate gradients' staging\n",
                 sh.window);
    std::abort();
  }
  const dim3 grid(ceil_div(sh.T, kGateThreads), sh.Hkv, B);
  scan_gates_kernel<<<grid, kGateThreads, bytes, stream>>>(dalpha, domega, dc, alpha, omega, sh.T,
                                                           sh.Hkv, sh.window);
  DMC_CUDA_CHECK_LAUNCH();
}

template <int kNV>
void scan_forward(bf16* xhat, bf16* yhat, float* denom, const bf16* x, const bf16* y,
                  const float* alpha, const float* omega, int B, int T, int Hkv, int D, int window,
                  cudaStream_t stream) {
  if (static_cast<long>(B) * T * Hkv * D <= 0) return;
  const Shape sh = make_shape(kNV, T, Hkv, D, window);
  if (D % 8 == 0)
    launch_forward<kNV, true>(xhat, yhat, denom, x, y, alpha, omega, sh, B, stream);
  else
    launch_forward<kNV, false>(xhat, yhat, denom, x, y, alpha, omega, sh, B, stream);
}

template <int kNV>
void scan_backward(bf16* dx, bf16* dy, float* dalpha, float* domega, const bf16* gx,
                   const bf16* gy, const bf16* x, const bf16* y, const bf16* xhat,
                   const bf16* yhat, const float* alpha, const float* omega, const float* denom,
                   int B, int T, int Hkv, int D, int window, bool accumulate,
                   cudaStream_t stream) {
  if (static_cast<long>(B) * T * Hkv * D <= 0 || !(dx || dalpha || domega)) return;
  const Shape sh = make_shape(kNV, T, Hkv, D, window);
  const size_t dc_bytes = sizeof(float) * B * Hkv * static_cast<size_t>(sh.window) * T;
  float* dc =
      dalpha || domega ? static_cast<float*>(scratch(kScratchDmcScanGates, dc_bytes)) : nullptr;
  if (D % 8 == 0)
    launch_backward<kNV, true>(dx, dy, dc, gx, gy, x, y, xhat, yhat, alpha, omega, denom, sh, B,
                               accumulate, stream);
  else
    launch_backward<kNV, false>(dx, dy, dc, gx, gy, x, y, xhat, yhat, alpha, omega, denom, sh, B,
                                accumulate, stream);
  if (dc) launch_gates(dalpha, domega, dc, alpha, omega, sh, B, stream);
}

}  // namespace

bool dmc_scan_window_fits(int T, int window) {
  return gate_staging_bytes(T, window) <= static_cast<size_t>(gate_staging_limit());
}

int dmc_scan_max_window() {
  return static_cast<int>((gate_staging_limit() / (2 * sizeof(float)) - kGateThreads) / 2 + 1);
}

void dmc_scan_forward(bf16* xhat, float* denom, const bf16* x, const float* alpha,
                      const float* omega, int B, int T, int Hkv, int D, int window,
                      cudaStream_t stream) {
  scan_forward<1>(xhat, nullptr, denom, x, nullptr, alpha, omega, B, T, Hkv, D, window, stream);
}

void dmc_scan_forward_kv(bf16* khat, bf16* vhat, float* denom, const bf16* k, const bf16* v,
                         const float* alpha, const float* omega, int B, int T, int Hkv, int D,
                         int window, cudaStream_t stream) {
  scan_forward<2>(khat, vhat, denom, k, v, alpha, omega, B, T, Hkv, D, window, stream);
}

void dmc_scan_backward(bf16* dx, float* dalpha, float* domega, const bf16* dxhat, const bf16* x,
                       const bf16* xhat, const float* alpha, const float* omega,
                       const float* denom, int B, int T, int Hkv, int D, int window,
                       bool accumulate, cudaStream_t stream) {
  scan_backward<1>(dx, nullptr, dalpha, domega, dxhat, nullptr, x, nullptr, xhat, nullptr, alpha,
                   omega, denom, B, T, Hkv, D, window, accumulate, stream);
}

void dmc_scan_backward_kv(bf16* dk, bf16* dv, float* dalpha, float* domega, const bf16* dkhat,
                          const bf16* dvhat, const bf16* k, const bf16* v, const bf16* khat,
                          const bf16* vhat, const float* alpha, const float* omega,
                          const float* denom, int B, int T, int Hkv, int D, int window,
                          bool accumulate, cudaStream_t stream) {
  scan_backward<2>(dk, dv, dalpha, domega, dkhat, dvhat, k, v, khat, vhat, alpha, omega, denom, B,
                   T, Hkv, D, window, accumulate, stream);
}

}  // namespace dmc::cuda
