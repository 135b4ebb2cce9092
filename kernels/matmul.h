// Linear layer in nn.Linear / Hugging Face layout: weight is [OC, IC], row-major.
//   out[N, OC] = inp[N, IC] · weight[OC, IC]^T
// The CPU reference is plain loops with a wide accumulator; the CUDA backend calls cuBLAS.
// Every backward in kernels/ ACCUMULATES (+=) into its parameter gradients (llm.c convention), so
// callers zero them once per step. An activation gradient is written by its first writer
// (accumulate false: nothing is read, so the buffer needs no zeroing first) and accumulated by
// the later ones (accumulate true), e.g. a residual branch adding into the stream's gradient.
#pragma once
#include <cstddef>

namespace dmc::kernels {

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, int N, int IC, int OC);

// dinp[N, IC] = dout · weight (accumulate false) or += (true);  dweight[OC, IC] += dout^T · inp
// (always accumulated).  Either output may be null.
template <typename T>
void matmul_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, int N,
                     int IC, int OC, bool accumulate);

}  // namespace dmc::kernels
