// DMC windowed partial accumulation on the GPU (spec: kernels/dmc_scan.h), fp32 arithmetic.
// Keys and values share alpha, omega and denom, so the _kv entry points take both (kPair): the gate
// products are formed once, and the backward's gate gradients, which are linear in dc, run once on
// dc_k + dc_v instead of once per tensor.
//
// Forward: one thread per (t, 8-channel group) of a tile walks its window backwards with a
// running product of alphas: c[t, j] = omega[j] · prod_{m=j+1..t} alpha[m].
//
// Backward, without dividing by alpha and without atomics:
//   dc[t, j] = (dxhat[t]·x[j] - dxhat[t]·xhat[t]) / denom[t]        (kernel 1, 8 lanes per (b,t,h),
//                                                                   stored in scratch slot 3)
//   dx[j]   += sum_{t=j}^{j+w-1} c[t, j] dxhat[t] / denom[t]          (kernel 2, gather over t)
//   domega[j] += sum_t dc[t, j] · prod_{j+1..t} alpha                   (kernel 3, gather)
//   dalpha[m] += sum_{t>=m} R(t) sum_{j<m} dc[t, j] omega[j] L(j),
//       R(t) = prod_{m+1..t} alpha, L(j) = prod_{j+1..m-1} alpha          (kernel 3, O(w^2) per m)
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// Tiling: a block takes kTile consecutive tokens of one (b, h) and first stages in shared memory
// every row its windows reach, so a row is read from global memory once per tile (plus a halo of
// w - 1 rows) instead of once per window that holds it: the untiled kernels re-read each row w
// times through L2 and ran at 19–31% of the copy bandwidth.
constexpr int kTile = 64;
constexpr int kThreads = 256;

// A tile's shared memory: two scalar rows (rows floats each, padded to 4 so the bf16 rows that
// follow stay 16-byte aligned), then [rows][D] bf16 of one or two tensors.
__host__ __device__ inline int padded(int rows) { return (rows + 3) & ~3; }
inline size_t tile_bytes(int rows, int D, bool pair) {
  return 2 * padded(rows) * sizeof(float) + static_cast<size_t>(pair ? 2 : 1) * rows * D * 2;
}
struct Tile {
  float* s0;
  float* s1;
  bf16* x;
  bf16* y;
};
__device__ __forceinline__ Tile tile_at(unsigned char* smem, int rows, int D) {
  Tile t;
  t.s0 = reinterpret_cast<float*>(smem);
  t.s1 = t.s0 + padded(rows);
  t.x = reinterpret_cast<bf16*>(t.s1 + padded(rows));
  t.y = t.x + static_cast<long>(rows) * D;
  return t;
}

// Rows t = first .. first + rows - 1 of (b, h) (base = the scalar index of (b, 0, h); x is
// [B, T, Hkv, D]) into dst [rows][D]; rows outside [0, T) are zeroed (their coefficients are
// never used). kVec: D % 8 == 0, 16-byte moves.
template <bool kVec>
__device__ __forceinline__ void stage_rows(bf16* dst, const bf16* src, long base, int first,
                                           int rows, int T, int Hkv, int D) {
  const int per_row = kVec ? D / 8 : D;
  for (int i = threadIdx.x; i < rows * per_row; i += blockDim.x) {
    const int r = i / per_row, c = i % per_row, t = first + r;
    const bool inside = t >= 0 && t < T;
    const long at = (base + static_cast<long>(t) * Hkv) * D;
    if (kVec) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (inside) v = *reinterpret_cast<const uint4*>(src + at + c * 8);
      *reinterpret_cast<uint4*>(dst + r * D + c * 8) = v;
    } else {
      dst[r * D + c] = inside ? src[at + c] : tobf(0.f);
    }
  }
}
__device__ __forceinline__ void stage_scalars(float* dst, const float* src, long base, int first,
                                              int rows, int T, int Hkv) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int t = first + r;
    dst[r] = t >= 0 && t < T ? src[base + static_cast<long>(t) * Hkv] : 0.f;
  }
}

// acc[i] += c · row[c0 + i] for the nc (<= 8) channels of a thread.
template <bool kVec>
__device__ __forceinline__ void axpy8(float (&acc)[8], float c, const bf16* row, int nc) {
  if (kVec) {
    float v[8];
    load8(v, row);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += c * v[i];
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nc) acc[i] += c * bf(row[i]);
  }
}

template <bool kVec>
__device__ __forceinline__ void store_row8(bf16* o, const float (&a)[8], int nc) {
  if (kVec) {
    store8(o, a);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nc) o[i] = tobf(a[i]);
  }
}

template <bool kVec>
__device__ __forceinline__ void add_row8(bf16* o, const float (&a)[8], int nc) {
  if (kVec) {
    float v[8];
    load8(v, o);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] += a[i];
    store8(o, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nc) o[i] = tobf(bf(o[i]) + a[i]);
  }
}

// Forward: the tile holds rows t0 - w + 1 .. t0 + kTile - 1 of x (and y), alpha (s0) and omega
// (s1); a thread per (t, 8-channel group) walks its window backwards with a running product of
// alphas: c[t, j] = omega[j] · prod_{m=j+1..t} alpha[m]. kPair: y → yhat too.
template <bool kVec, bool kPair>
__global__ void __launch_bounds__(kThreads)
    scan_forward_kernel(bf16* xhat, bf16* yhat, float* denom, const bf16* x, const bf16* y,
                        const float* alpha, const float* omega, int T, int Hkv, int D,
                        int window) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int t0 = blockIdx.x * kTile, rows = kTile + window - 1, first = t0 - (window - 1);
  const long base = static_cast<long>(blockIdx.z) * T * Hkv + blockIdx.y;
  const Tile tile = tile_at(smem, rows, D);
  stage_scalars(tile.s0, alpha, base, first, rows, T, Hkv);
  stage_scalars(tile.s1, omega, base, first, rows, T, Hkv);
  stage_rows<kVec>(tile.x, x, base, first, rows, T, Hkv, D);
  if (kPair) stage_rows<kVec>(tile.y, y, base, first, rows, T, Hkv, D);
  __syncthreads();
  const int groups = (D + 7) / 8;
  for (int item = threadIdx.x; item < kTile * groups; item += blockDim.x) {
    const int tl = item / groups, g = item % groups, t = t0 + tl;
    if (t >= T) break;  // items run in token order: so do all later ones
    const int c0 = g * 8, nc = min(8, D - c0);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, acc2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float den = 0.f, prod = 1.f;
    const int last = tl + window - 1;  // t's row in the tile
    for (int r = last; r > last - min(window, t + 1); --r) {
      const float cj = tile.s1[r] * prod;
      den += cj;
      axpy8<kVec>(acc, cj, tile.x + r * D + c0, nc);
      if (kPair) axpy8<kVec>(acc2, cj, tile.y + r * D + c0, nc);
      prod *= tile.s0[r];
    }
    const float inv = 1.f / den;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      acc[i] *= inv;
      acc2[i] *= inv;
    }
    const long s = base + static_cast<long>(t) * Hkv;
    store_row8<kVec>(xhat + s * D + c0, acc, nc);
    if (kPair) store_row8<kVec>(yhat + s * D + c0, acc2, nc);
    if (g == 0 && denom) denom[s] = den;
  }
}

// dc[s, k] for j = t - k, k < window (0 where j < 0); with kPair the sum of the x and y terms.
// The tile holds x (and y) as the forward's does; kDcLanes lanes per token row: each dot product
// ends in 3 shuffles, not a warp's 5. kChunks (D = 64 kChunks): each lane holds 8·kChunks
// channels of dxhat (and dyhat) in registers and reads rows as 16-byte vectors; kChunks 0 is the
// scalar path for any D.
constexpr int kDcLanes = 8;

template <int kChunks>
__device__ __forceinline__ float row_dot(const float (&a)[kChunks > 0 ? 8 * kChunks : 1],
                                         const bf16* row, int sub, const bf16* a_row, int D) {
  float d = 0.f;
  if (kChunks > 0) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      float v[8];
      load8(v, row + (sub * kChunks + c) * 8);
#pragma unroll
      for (int i = 0; i < 8; ++i) d += a[8 * c + i] * v[i];
    }
  } else {
    for (int c = sub; c < D; c += kDcLanes) d += bf(a_row[c]) * bf(row[c]);
  }
  return d;
}

template <int kChunks>
__device__ __forceinline__ void load_row(float (&a)[kChunks > 0 ? 8 * kChunks : 1], const bf16* row,
                                         int sub) {
  if (kChunks > 0) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      float v[8];
      load8(v, row + (sub * kChunks + c) * 8);
#pragma unroll
      for (int i = 0; i < 8; ++i) a[8 * c + i] = v[i];
    }
  }
}

template <int kChunks, bool kPair>
__global__ void __launch_bounds__(kThreads)
    scan_backward_dc(float* dc, const bf16* dxhat, const bf16* x, const bf16* xhat,
                     const bf16* dyhat, const bf16* y, const bf16* yhat, const float* denom,
                     int T, int Hkv, int D, int window) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int t0 = blockIdx.x * kTile, rows = kTile + window - 1, first = t0 - (window - 1);
  const long base = static_cast<long>(blockIdx.z) * T * Hkv + blockIdx.y;
  const Tile tile = tile_at(smem, rows, D);
  stage_rows<(kChunks > 0)>(tile.x, x, base, first, rows, T, Hkv, D);
  if (kPair) stage_rows<(kChunks > 0)>(tile.y, y, base, first, rows, T, Hkv, D);
  __syncthreads();
  const int sub = threadIdx.x % kDcLanes;
  const unsigned group = 0xFFu << (threadIdx.x & 31 & ~(kDcLanes - 1));
  auto group_sum = [group](float v) {
#pragma unroll
    for (int o = kDcLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(group, v, o);
    return v;
  };
  for (int tl = threadIdx.x / kDcLanes; tl < kTile; tl += blockDim.x / kDcLanes) {
    const int t = t0 + tl;
    if (t >= T) break;  // the same for the whole group
    const long s = base + static_cast<long>(t) * Hkv;
    const bf16* dx_row = dxhat + s * D;
    const bf16* dy_row = kPair ? dyhat + s * D : nullptr;
    float gx[kChunks > 0 ? 8 * kChunks : 1], gy[kChunks > 0 ? 8 * kChunks : 1];
    load_row<kChunks>(gx, dx_row, sub);
    if (kPair) load_row<kChunks>(gy, dy_row, sub);
    float gself = row_dot<kChunks>(gx, xhat + s * D, sub, dx_row, D);
    if (kPair) gself += row_dot<kChunks>(gy, yhat + s * D, sub, dy_row, D);
    gself = group_sum(gself);
    const float inv = 1.f / denom[s];
    const int last = tl + window - 1;  // t's row in the tile
    for (int k = 0; k < window; ++k) {
      float v = 0.f;
      if (t - k >= 0) {
        float d = row_dot<kChunks>(gx, tile.x + (last - k) * D, sub, dx_row, D);
        if (kPair) d += row_dot<kChunks>(gy, tile.y + (last - k) * D, sub, dy_row, D);
        v = (group_sum(d) - gself) * inv;
      }
      if (sub == 0) dc[s * window + k] = v;
    }
  }
}

// dx[j] += sum_{t=j}^{j+w-1} omega[j] · prod_{j+1..t} alpha / denom[t] · dxhat[t]: the tile holds
// rows j0 .. j0 + kTile + w - 2 of dxhat (and dyhat), alpha (s0) and denom (s1), the rows a
// tile's tokens gather from.
template <bool kVec, bool kPair>
__global__ void __launch_bounds__(kThreads)
    scan_backward_dx(bf16* dx, bf16* dy, const bf16* dxhat, const bf16* dyhat,
                     const float* alpha, const float* omega, const float* denom, int T, int Hkv,
                     int D, int window) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int j0 = blockIdx.x * kTile, rows = kTile + window - 1;
  const long base = static_cast<long>(blockIdx.z) * T * Hkv + blockIdx.y;
  const Tile tile = tile_at(smem, rows, D);
  stage_scalars(tile.s0, alpha, base, j0, rows, T, Hkv);
  stage_scalars(tile.s1, denom, base, j0, rows, T, Hkv);
  stage_rows<kVec>(tile.x, dxhat, base, j0, rows, T, Hkv, D);
  if (kPair) stage_rows<kVec>(tile.y, dyhat, base, j0, rows, T, Hkv, D);
  __syncthreads();
  const int groups = (D + 7) / 8;
  for (int item = threadIdx.x; item < kTile * groups; item += blockDim.x) {
    const int jl = item / groups, g = item % groups, j = j0 + jl;
    if (j >= T) break;
    const int c0 = g * 8, nc = min(8, D - c0);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, acc2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const long s = base + static_cast<long>(j) * Hkv;
    const float w = omega[s];
    float prod = 1.f;
    for (int r = jl; r < jl + min(window, T - j); ++r) {  // r: row of t = j0 + r
      if (r > jl) prod *= tile.s0[r];
      const float coef = w * prod / tile.s1[r];
      axpy8<kVec>(acc, coef, tile.x + r * D + c0, nc);
      if (kPair) axpy8<kVec>(acc2, coef, tile.y + r * D + c0, nc);
    }
    add_row8<kVec>(dx + s * D + c0, acc, nc);
    if (kPair) add_row8<kVec>(dy + s * D + c0, acc2, nc);
  }
}

// One block per (kTile tokens, KV head, sequence), with the tile's shared memory.
template <typename Kernel, typename... Args>
void launch_tiled(Kernel kernel, size_t bytes, int B, int T, int Hkv, cudaStream_t stream,
                  Args... args) {
  constexpr size_t kDefaultSmem = 48 << 10, kMaxSmem = 227 << 10;
  if (bytes > kMaxSmem) {
    std::fprintf(stderr,
                 "dmc_scan: a tile of %d tokens plus the window needs %zu bytes of shared memory "
                 "(at most %zu): the window is too large\n",
                 kTile, bytes, kMaxSmem);
    std::abort();
  }
  if (bytes > kDefaultSmem)
    DMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  kernel<<<dim3(ceil_div(T, kTile), Hkv, B), kThreads, bytes, stream>>>(args...);
  DMC_CUDA_CHECK_LAUNCH();
}

// One thread per (b, m, h).
__global__ void scan_backward_gates(float* dalpha, float* domega, const float* dc,
                                    const float* alpha, const float* omega, int B, int T, int Hkv,
                                    int window) {
  const long s = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= static_cast<long>(B) * T * Hkv) return;
  const int m = static_cast<int>((s / Hkv) % T);
  if (domega) {
    float acc = 0.f, prod = 1.f;
    const int tmax = min(T - 1, m + window - 1);
    for (int t = m; t <= tmax; ++t) {
      const long st = s + static_cast<long>(t - m) * Hkv;
      if (t > m) prod *= alpha[st];
      acc += dc[st * window + (t - m)] * prod;
    }
    domega[s] += acc;
  }
  if (dalpha && m >= 1) {
    // token pairs (t, j) with j < m <= t and t - j < window
    float acc = 0.f, R = 1.f;
    const int tmax = min(T - 1, m + window - 2);
    for (int t = m; t <= tmax; ++t) {
      const long st = s + static_cast<long>(t - m) * Hkv;
      if (t > m) R *= alpha[st];
      float inner = 0.f, L = 1.f;
      const int jmin = max(0, t - window + 1);
      for (int j = m - 1; j >= jmin; --j) {
        const long sj = s - static_cast<long>(m - j) * Hkv;
        inner += dc[st * window + (t - j)] * omega[sj] * L;
        L *= alpha[sj];
      }
      acc += R * inner;
    }
    dalpha[s] += acc;
  }
}

template <bool kPair>
void scan_forward(bf16* xhat, bf16* yhat, float* denom, const bf16* x, const bf16* y,
                  const float* alpha, const float* omega, int B, int T, int Hkv, int D, int window,
                  cudaStream_t stream) {
  if (static_cast<long>(B) * T * Hkv * D <= 0) return;
  const size_t bytes = tile_bytes(kTile + window - 1, D, kPair);
  if (D % 8 == 0)
    launch_tiled(scan_forward_kernel<true, kPair>, bytes, B, T, Hkv, stream, xhat, yhat, denom, x,
                 y, alpha, omega, T, Hkv, D, window);
  else
    launch_tiled(scan_forward_kernel<false, kPair>, bytes, B, T, Hkv, stream, xhat, yhat, denom, x,
                 y, alpha, omega, T, Hkv, D, window);
}

template <int kChunks, bool kPair>
void launch_dc(float* dc, const bf16* dxhat, const bf16* x, const bf16* xhat, const bf16* dyhat,
               const bf16* y, const bf16* yhat, const float* denom, int B, int T, int Hkv, int D,
               int window, cudaStream_t stream) {
  launch_tiled(scan_backward_dc<kChunks, kPair>, tile_bytes(kTile + window - 1, D, kPair), B, T,
               Hkv, stream, dc, dxhat, x, xhat, dyhat, y, yhat, denom, T, Hkv, D, window);
}

template <bool kPair>
void scan_backward(bf16* dx, bf16* dy, float* dalpha, float* domega, const bf16* dxhat,
                   const bf16* dyhat, const bf16* x, const bf16* y, const bf16* xhat,
                   const bf16* yhat, const float* alpha, const float* omega, const float* denom,
                   int B, int T, int Hkv, int D, int window, cudaStream_t stream) {
  const long scalars = static_cast<long>(B) * T * Hkv;
  if (scalars <= 0) return;
  if (dalpha || domega) {
    float* dc = static_cast<float*>(scratch(3, sizeof(float) * scalars * window));
    if (D == 64)
      launch_dc<1, kPair>(dc, dxhat, x, xhat, dyhat, y, yhat, denom, B, T, Hkv, D, window, stream);
    else if (D == 128)
      launch_dc<2, kPair>(dc, dxhat, x, xhat, dyhat, y, yhat, denom, B, T, Hkv, D, window, stream);
    else
      launch_dc<0, kPair>(dc, dxhat, x, xhat, dyhat, y, yhat, denom, B, T, Hkv, D, window, stream);
    scan_backward_gates<<<ceil_div(scalars, 256), 256, 0, stream>>>(dalpha, domega, dc, alpha,
                                                                   omega, B, T, Hkv, window);
    DMC_CUDA_CHECK_LAUNCH();
  }
  if (dx) {
    const size_t bytes = tile_bytes(kTile + window - 1, D, kPair);
    if (D % 8 == 0)
      launch_tiled(scan_backward_dx<true, kPair>, bytes, B, T, Hkv, stream, dx, dy, dxhat, dyhat,
                   alpha, omega, denom, T, Hkv, D, window);
    else
      launch_tiled(scan_backward_dx<false, kPair>, bytes, B, T, Hkv, stream, dx, dy, dxhat, dyhat,
                   alpha, omega, denom, T, Hkv, D, window);
  }
}

}  // namespace

void dmc_scan_forward(bf16* xhat, float* denom, const bf16* x, const float* alpha,
                      const float* omega, int B, int T, int Hkv, int D, int window,
                      cudaStream_t stream) {
  scan_forward<false>(xhat, nullptr, denom, x, nullptr, alpha, omega, B, T, Hkv, D, window, stream);
}

void dmc_scan_forward_kv(bf16* khat, bf16* vhat, float* denom, const bf16* k, const bf16* v,
                         const float* alpha, const float* omega, int B, int T, int Hkv, int D,
                         int window, cudaStream_t stream) {
  scan_forward<true>(khat, vhat, denom, k, v, alpha, omega, B, T, Hkv, D, window, stream);
}

void dmc_scan_backward(bf16* dx, float* dalpha, float* domega, const bf16* dxhat, const bf16* x,
                       const bf16* xhat, const float* alpha, const float* omega,
                       const float* denom, int B, int T, int Hkv, int D, int window,
                       cudaStream_t stream) {
  scan_backward<false>(dx, nullptr, dalpha, domega, dxhat, nullptr, x, nullptr, xhat, nullptr,
                       alpha, omega, denom, B, T, Hkv, D, window, stream);
}

void dmc_scan_backward_kv(bf16* dk, bf16* dv, float* dalpha, float* domega, const bf16* dkhat,
                          const bf16* dvhat, const bf16* k, const bf16* v, const bf16* khat,
                          const bf16* vhat, const float* alpha, const float* omega,
                          const float* denom, int B, int T, int Hkv, int D, int window,
                          cudaStream_t stream) {
  scan_backward<true>(dk, dv, dalpha, domega, dkhat, dvhat, k, v, khat, vhat, alpha, omega, denom,
                      B, T, Hkv, D, window, stream);
}

}  // namespace dmc::cuda
