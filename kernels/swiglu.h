// SwiGLU activation of the Llama MLP: out = silu(gate) · up, silu(x) = x · sigmoid(x), elementwise
// over rows × F. Row r of gate and of up starts at r · ld (ld >= F), so that the fused gate/up
// projection's output [rows, 2F] (row r: gate_r then up_r) is read in place with gate = gu,
// up = gu + F, ld = 2F; separate [rows, F] arrays have ld = F. out is [rows, F].
#pragma once
#include <cstddef>

namespace dmc::kernels {

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, size_t rows, size_t F, size_t ld);

// dgate = dout · up · silu'(gate);  dup = dout · silu(gate)  (accumulate: += instead); dgate and
// dup in the inputs' layout (row stride ld), dout [rows, F]; either output may be null.
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t rows,
                     size_t F, size_t ld, bool accumulate);

}  // namespace dmc::kernels
