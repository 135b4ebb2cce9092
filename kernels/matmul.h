// Linear layer in nn.Linear / Hugging Face layout: weight is [OC, IC], row-major.
//   out[N, OC] = inp[N, IC] · weight[OC, IC]^T
// The CPU reference is plain loops with a wide accumulator; the CUDA backend calls cuBLAS (cuBLASLt
// for the residual form), except a forward of at most 2 rows (a decode step), which reads the
// weights in its own kernel (kernels/matmul.cu).
// A backward in kernels/ writes (accumulate false: nothing is read, so the buffer needs no zeroing
// first) or adds into (accumulate true) every gradient it is given, parameter and activation
// alike. A gradient is written by its first writer and added into by the later ones: a residual
// branch into the stream's gradient; a weight gradient by the micro-batches of gradient
// accumulation after the first. Outputs that always add say so (embedding_backward's scatter).
#pragma once
#include <cstddef>

namespace dmc::kernels {

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, int N, int IC, int OC);

// A projection added onto the residual stream, in one pass:
//   out[N, OC] = residual[N, OC] + inp[N, IC] · weight[OC, IC]^T
// Rounded once: the residual element joins the product's wide accumulator and only that sum is
// rounded to T (the CUDA version: fp32 accumulation, one rounding to bf16), never the product
// first and then the sum. out overlaps none of residual, inp and weight (in place, out ==
// residual, cuBLASLt picked a kernel that rounds twice on the H100: refused).
template <typename T>
void matmul_forward_residual(T* out, const T* inp, const T* weight, const T* residual, int N,
                             int IC, int OC);

// dinp[N, IC] = dout · weight;  dweight[OC, IC] = dout^T · inp;  both written (accumulate false)
// or added into (true).  Either output may be null.
template <typename T>
void matmul_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, int N,
                     int IC, int OC, bool accumulate);

}  // namespace dmc::kernels
