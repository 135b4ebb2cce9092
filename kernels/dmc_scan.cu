// DMC windowed partial accumulation on the GPU (spec: kernels/dmc_scan.h), fp32 arithmetic.
// Keys and values share alpha, omega and denom, so the _kv entry points take both (kPair): the gate
// products are formed once, and the backward's gate gradients, which are linear in dc, run once on
// dc_k + dc_v instead of once per tensor.
//
// Forward: one thread per (b, t, h, 8-channel group) walks its window backwards with a running
// product of alphas: c[t, j] = omega[j] · prod_{m=j+1..t} alpha[m].
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

// x index of (b, t, h, c) with x [B, T, Hkv, D]; scalar arrays [B, T, Hkv].
// kVec (D % 8 == 0): the 8 channels of a thread move as one 16-byte vector. kPair: y → yhat too.
template <bool kVec, bool kPair>
__global__ void scan_forward_kernel(bf16* xhat, bf16* yhat, float* denom, const bf16* x,
                                    const bf16* y, const float* alpha, const float* omega, int B,
                                    int T, int Hkv, int D, int window) {
  const int groups = (D + 7) / 8;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * Hkv * groups) return;
  const int g = static_cast<int>(idx % groups);
  const long s = idx / groups;  // (b, t, h) scalar index
  const int t = static_cast<int>((s / Hkv) % T);
  const int c0 = g * 8;
  const int nc = min(8, D - c0);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, acc2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float den = 0.f, prod = 1.f;
  const int jmin = max(0, t - window + 1);
  for (int j = t; j >= jmin; --j) {
    const long sj = s - static_cast<long>(t - j) * Hkv;
    const float cj = omega[sj] * prod;
    den += cj;
    const bf16* xr = x + sj * D + c0;
    const bf16* yr = kPair ? y + sj * D + c0 : nullptr;
    if (kVec) {
      float v[8];
      load8(v, xr);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += cj * v[i];
      if (kPair) {
        load8(v, yr);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc2[i] += cj * v[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < nc) {
          acc[i] += cj * bf(xr[i]);
          if (kPair) acc2[i] += cj * bf(yr[i]);
        }
    }
    prod *= alpha[sj];
  }
  const float inv = 1.f / den;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    acc[i] *= inv;
    acc2[i] *= inv;
  }
  bf16* o = xhat + s * D + c0;
  bf16* o2 = kPair ? yhat + s * D + c0 : nullptr;
  if (kVec) {
    store8(o, acc);
    if (kPair) store8(o2, acc2);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nc) {
        o[i] = tobf(acc[i]);
        if (kPair) o2[i] = tobf(acc2[i]);
      }
  }
  if (g == 0 && denom) denom[s] = den;
}

// dc[s, k] for j = t - k, k < window (0 where j < 0); with kPair the sum of the x and y terms.
// kDcLanes lanes per (b, t, h) row: each dot product ends in 3 shuffles, not a warp's 5. kChunks
// (D = 64 kChunks): each lane holds 8·kChunks channels of dxhat (and dyhat) in registers and reads
// rows as 16-byte vectors; kChunks 0 is the scalar path for any D.
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
__global__ void scan_backward_dc(float* dc, const bf16* dxhat, const bf16* x, const bf16* xhat,
                                 const bf16* dyhat, const bf16* y, const bf16* yhat,
                                 const float* denom, int B, int T, int Hkv, int D, int window) {
  const long s = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) / kDcLanes;
  const int sub = threadIdx.x % kDcLanes;
  if (s >= static_cast<long>(B) * T * Hkv) return;  // whole groups leave: blockDim % 8 == 0
  const unsigned group = 0xFFu << (threadIdx.x & 31 & ~(kDcLanes - 1));
  auto group_sum = [group](float v) {
#pragma unroll
    for (int o = kDcLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(group, v, o);
    return v;
  };
  const int t = static_cast<int>((s / Hkv) % T);
  const bf16* dx_row = dxhat + s * D;
  const bf16* dy_row = kPair ? dyhat + s * D : nullptr;
  float gx[kChunks > 0 ? 8 * kChunks : 1], gy[kChunks > 0 ? 8 * kChunks : 1];
  load_row<kChunks>(gx, dx_row, sub);
  if (kPair) load_row<kChunks>(gy, dy_row, sub);
  float gself = row_dot<kChunks>(gx, xhat + s * D, sub, dx_row, D);
  if (kPair) gself += row_dot<kChunks>(gy, yhat + s * D, sub, dy_row, D);
  gself = group_sum(gself);
  const float inv = 1.f / denom[s];
  for (int k = 0; k < window; ++k) {
    float v = 0.f;
    if (t - k >= 0) {  // uniform over the group
      const long sj = s - static_cast<long>(k) * Hkv;
      float d = row_dot<kChunks>(gx, x + sj * D, sub, dx_row, D);
      if (kPair) d += row_dot<kChunks>(gy, y + sj * D, sub, dy_row, D);
      v = (group_sum(d) - gself) * inv;
    }
    if (sub == 0) dc[s * window + k] = v;
  }
}

template <bool kVec, bool kPair>
__global__ void scan_backward_dx(bf16* dx, bf16* dy, const bf16* dxhat, const bf16* dyhat,
                                 const float* alpha, const float* omega, const float* denom, int B,
                                 int T, int Hkv, int D, int window) {
  const int groups = (D + 7) / 8;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * Hkv * groups) return;
  const int g = static_cast<int>(idx % groups);
  const long s = idx / groups;  // (b, j, h)
  const int j = static_cast<int>((s / Hkv) % T);
  const int c0 = g * 8;
  const int nc = min(8, D - c0);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, acc2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const float w = omega[s];
  float prod = 1.f;
  const int tmax = min(T - 1, j + window - 1);
  for (int t = j; t <= tmax; ++t) {
    const long st = s + static_cast<long>(t - j) * Hkv;
    if (t > j) prod *= alpha[st];
    const float coef = w * prod / denom[st];
    const bf16* gr = dxhat + st * D + c0;
    const bf16* gr2 = kPair ? dyhat + st * D + c0 : nullptr;
    if (kVec) {
      float v[8];
      load8(v, gr);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += coef * v[i];
      if (kPair) {
        load8(v, gr2);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc2[i] += coef * v[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < nc) {
          acc[i] += coef * bf(gr[i]);
          if (kPair) acc2[i] += coef * bf(gr2[i]);
        }
    }
  }
  auto add_to = [&](bf16* out, const float(&a)[8]) {
    bf16* o = out + s * D + c0;
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
  };
  add_to(dx, acc);
  if (kPair) add_to(dy, acc2);
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
  const long total = static_cast<long>(B) * T * Hkv * ((D + 7) / 8);
  if (total <= 0) return;
  if (D % 8 == 0)
    scan_forward_kernel<true, kPair><<<ceil_div(total, 256), 256, 0, stream>>>(
        xhat, yhat, denom, x, y, alpha, omega, B, T, Hkv, D, window);
  else
    scan_forward_kernel<false, kPair><<<ceil_div(total, 256), 256, 0, stream>>>(
        xhat, yhat, denom, x, y, alpha, omega, B, T, Hkv, D, window);
  DMC_CUDA_CHECK_LAUNCH();
}

template <int kChunks, bool kPair>
void launch_dc(float* dc, const bf16* dxhat, const bf16* x, const bf16* xhat, const bf16* dyhat,
               const bf16* y, const bf16* yhat, const float* denom, int B, int T, int Hkv, int D,
               int window, cudaStream_t stream) {
  const long threads = static_cast<long>(B) * T * Hkv * kDcLanes;
  scan_backward_dc<kChunks, kPair><<<ceil_div(threads, 256), 256, 0, stream>>>(
      dc, dxhat, x, xhat, dyhat, y, yhat, denom, B, T, Hkv, D, window);
  DMC_CUDA_CHECK_LAUNCH();
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
    const long total = scalars * ((D + 7) / 8);
    if (D % 8 == 0)
      scan_backward_dx<true, kPair><<<ceil_div(total, 256), 256, 0, stream>>>(
          dx, dy, dxhat, dyhat, alpha, omega, denom, B, T, Hkv, D, window);
    else
      scan_backward_dx<false, kPair><<<ceil_div(total, 256), 256, 0, stream>>>(
          dx, dy, dxhat, dyhat, alpha, omega, denom, B, T, Hkv, D, window);
    DMC_CUDA_CHECK_LAUNCH();
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
