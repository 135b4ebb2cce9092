// Linear layer in nn.Linear / Hugging Face layout: weight is [OC, IC], row-major.
//   out[N, OC] = inp[N, IC] · weight[OC, IC]^T
// The CPU reference is plain loops with a wide accumulator; the CUDA backend calls cuBLAS.
// Every backward in kernels/ ACCUMULATES (+=) into its gradient outputs (llm.c convention), so
// residual branches need no extra adds and callers zero gradients once per step.
#pragma once
#include <cstddef>

namespace dmc::kernels {

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, int N, int IC, int OC);

// dinp[N, IC] += dout · weight ;  dweight[OC, IC] += dout^T · inp.  Either output may be null.
template <typename T>
void matmul_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, int N,
                     int IC, int OC);

}  // namespace dmc::kernels
