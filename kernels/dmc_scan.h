// DMC windowed partial accumulation ("poolsum", model/DMC.md §3) of keys or values, per (b, KV head h):
//   xhat[t] = sum_{j = max(0, t-w+1)}^{t} c[t,j] x[j]  /  denom[t]
//   denom[t] = sum_{same j} c[t,j],     c[t,j] = omega[j] · prod_{m = j+1}^{t} alpha[m]
// (alpha[0] is never used). With alpha = 0 everywhere xhat = x; with alpha = 1 it is the
// omega-weighted mean of the last w tokens. x, xhat are [B, T, Hkv, D]; alpha, omega, denom are
// [B, T, Hkv]. The CPU reference works directly from this definition in O(T·w·D).
#pragma once

namespace dmc::kernels {

template <typename T>
void dmc_scan_forward(T* xhat, T* denom, const T* x, const T* alpha, const T* omega, int B,
                      int T_, int Hkv, int D, int window);

// Writes dx (accumulate false) or adds to it (true); always accumulates dalpha, domega (which may
// be null), so that keys and values, scanned one after the other, each add their part. Must not
// divide by alpha: hard decisions make alpha exactly 0.
template <typename T>
void dmc_scan_backward(T* dx, T* dalpha, T* domega, const T* dxhat, const T* x, const T* xhat,
                       const T* alpha, const T* omega, const T* denom, int B, int T_, int Hkv, int D,
                       int window, bool accumulate);

}  // namespace dmc::kernels
