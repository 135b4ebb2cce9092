// Token embedding lookup: out[n, :] = wte[tokens[n], :] for wte [V, C].
#pragma once
#include <cstdint>

namespace dmc::kernels {

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int N, int C);

// dwte[tokens[n], :] += dout[n, :]
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int N, int C);

}  // namespace dmc::kernels
