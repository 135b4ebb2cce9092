// SwiGLU activation of the Llama MLP: out = silu(gate) · up, silu(x) = x · sigmoid(x), elementwise.
#pragma once
#include <cstddef>

namespace dmc::kernels {

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, size_t n);

// dgate = dout · up · silu'(gate);  dup = dout · silu(gate)  (accumulate: += instead); either
// output may be null.
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t n,
                     bool accumulate);

}  // namespace dmc::kernels
