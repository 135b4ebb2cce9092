// DMC windowed partial accumulation on the GPU (spec: kernels/dmc_scan.h), fp32 arithmetic.
//
// Forward: one thread per (b, t, h, 8-channel group) walks its window backwards with a running
// product of alphas: c[t, j] = omega[j] · prod_{m=j+1..t} alpha[m].
//
// Backward, without dividing by alpha and without atomics:
//   dc[t, j] = (dxhat[t]·x[j] - dxhat[t]·xhat[t]) / denom[t]        (kernel 1, one warp per (b,t,h),
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
// kVec (D % 8 == 0): the 8 channels of a thread move as one 16-byte vector.
template <bool kVec>
__global__ void scan_forward_kernel(bf16* xhat, float* denom, const bf16* x, const float* alpha,
                                    const float* omega, int B, int T, int Hkv, int D, int window) {
  const int groups = (D + 7) / 8;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * Hkv * groups) return;
  const int g = static_cast<int>(idx % groups);
  const long s = idx / groups;  // (b, t, h) scalar index
  const int t = static_cast<int>((s / Hkv) % T);
  const int c0 = g * 8;
  const int nc = min(8, D - c0);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float den = 0.f, prod = 1.f;
  const int jmin = max(0, t - window + 1);
  for (int j = t; j >= jmin; --j) {
    const long sj = s - static_cast<long>(t - j) * Hkv;
    const float cj = omega[sj] * prod;
    den += cj;
    const bf16* xr = x + sj * D + c0;
    if (kVec) {
      float v[8];
      load8(v, xr);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += cj * v[i];
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < nc) acc[i] += cj * bf(xr[i]);
    }
    prod *= alpha[sj];
  }
  bf16* o = xhat + s * D + c0;
  const float inv = 1.f / den;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] *= inv;
  if (kVec) {
    store8(o, acc);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nc) o[i] = tobf(acc[i]);
  }
  if (g == 0 && denom) denom[s] = den;
}

// dc[s, k] for j = t - k, k < window (0 where j < 0). One warp per (b, t, h).
__global__ void scan_backward_dc(float* dc, const bf16* dxhat, const bf16* x, const bf16* xhat,
                                 const float* denom, int B, int T, int Hkv, int D, int window) {
  const long s = static_cast<long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (s >= static_cast<long>(B) * T * Hkv) return;
  const int t = static_cast<int>((s / Hkv) % T);
  const bf16* dy = dxhat + s * D;
  float gself = 0.f;
  for (int c = lane; c < D; c += 32) gself += bf(dy[c]) * bf(xhat[s * D + c]);
  gself = warp_sum(gself);
  const float inv = 1.f / denom[s];
  for (int k = 0; k < window; ++k) {
    float v = 0.f;
    if (t - k >= 0) {
      const bf16* xr = x + (s - static_cast<long>(k) * Hkv) * D;
      float d = 0.f;
      for (int c = lane; c < D; c += 32) d += bf(dy[c]) * bf(xr[c]);
      d = warp_sum(d);
      v = (d - gself) * inv;
    }
    if (lane == 0) dc[s * window + k] = v;
  }
}

template <bool kVec>
__global__ void scan_backward_dx(bf16* dx, const bf16* dxhat, const float* alpha,
                                 const float* omega, const float* denom, int B, int T, int Hkv,
                                 int D, int window) {
  const int groups = (D + 7) / 8;
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * Hkv * groups) return;
  const int g = static_cast<int>(idx % groups);
  const long s = idx / groups;  // (b, j, h)
  const int j = static_cast<int>((s / Hkv) % T);
  const int c0 = g * 8;
  const int nc = min(8, D - c0);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const float w = omega[s];
  float prod = 1.f;
  const int tmax = min(T - 1, j + window - 1);
  for (int t = j; t <= tmax; ++t) {
    const long st = s + static_cast<long>(t - j) * Hkv;
    if (t > j) prod *= alpha[st];
    const float coef = w * prod / denom[st];
    const bf16* dy = dxhat + st * D + c0;
    if (kVec) {
      float v[8];
      load8(v, dy);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += coef * v[i];
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < nc) acc[i] += coef * bf(dy[i]);
    }
  }
  bf16* o = dx + s * D + c0;
  if (kVec) {
    float v[8];
    load8(v, o);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] += acc[i];
    store8(o, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nc) o[i] = tobf(bf(o[i]) + acc[i]);
  }
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

}  // namespace

void dmc_scan_forward(bf16* xhat, float* denom, const bf16* x, const float* alpha,
                      const float* omega, int B, int T, int Hkv, int D, int window,
                      cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * Hkv * ((D + 7) / 8);
  if (total <= 0) return;
  if (D % 8 == 0)
    scan_forward_kernel<true><<<ceil_div(total, 256), 256, 0, stream>>>(xhat, denom, x, alpha, omega,
                                                                       B, T, Hkv, D, window);
  else
    scan_forward_kernel<false><<<ceil_div(total, 256), 256, 0, stream>>>(xhat, denom, x, alpha, omega,
                                                                        B, T, Hkv, D, window);
  DMC_CUDA_CHECK_LAUNCH();
}

void dmc_scan_backward(bf16* dx, float* dalpha, float* domega, const bf16* dxhat, const bf16* x,
                       const bf16* xhat, const float* alpha, const float* omega,
                       const float* denom, int B, int T, int Hkv, int D, int window,
                       cudaStream_t stream) {
  const long scalars = static_cast<long>(B) * T * Hkv;
  if (scalars <= 0) return;
  if (dalpha || domega) {
    float* dc = static_cast<float*>(scratch(3, sizeof(float) * scalars * window));
    scan_backward_dc<<<ceil_div(scalars, 8), 256, 0, stream>>>(dc, dxhat, x, xhat, denom, B, T,
                                                              Hkv, D, window);
    DMC_CUDA_CHECK_LAUNCH();
    scan_backward_gates<<<ceil_div(scalars, 256), 256, 0, stream>>>(dalpha, domega, dc, alpha,
                                                                   omega, B, T, Hkv, window);
    DMC_CUDA_CHECK_LAUNCH();
  }
  if (dx) {
    const long total = scalars * ((D + 7) / 8);
    if (D % 8 == 0)
      scan_backward_dx<true><<<ceil_div(total, 256), 256, 0, stream>>>(dx, dxhat, alpha, omega, denom,
                                                                      B, T, Hkv, D, window);
    else
      scan_backward_dx<false><<<ceil_div(total, 256), 256, 0, stream>>>(dx, dxhat, alpha, omega,
                                                                       denom, B, T, Hkv, D, window);
    DMC_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dmc::cuda
