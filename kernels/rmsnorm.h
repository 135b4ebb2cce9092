// RMSNorm (Llama): out = inp · rstd · weight, rstd = 1 / sqrt(mean_c(inp^2) + eps), per row of C.
// rstd[N] is saved for the backward pass.
#pragma once

namespace dmc::kernels {

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int N, int C, float eps);

// dinp[N, C] = ..., dweight[C] = ..., both written (accumulate false) or added into (true); either
// may be null.
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int N, int C, bool accumulate);

}  // namespace dmc::kernels
