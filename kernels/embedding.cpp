// Token embedding (spec: kernels/embedding.h): a row lookup, out[n, :] = wte[tokens[n], :].
// The backward scatters each output gradient row back into the table row it came from; a token
// that occurs several times in the batch sums all of its rows (in order n = 0, 1, ...).
#include "kernels/embedding.h"

#include <cassert>

namespace dmc::kernels {

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int N, int C) {
  for (int n = 0; n < N; ++n) {
    assert(tokens[n] >= 0);
    const T* row = wte + static_cast<long>(tokens[n]) * C;
    T* o = out + static_cast<long>(n) * C;
    for (int c = 0; c < C; ++c) o[c] = row[c];
  }
}

template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int N, int C) {
  for (int n = 0; n < N; ++n) {
    assert(tokens[n] >= 0);
    T* row = dwte + static_cast<long>(tokens[n]) * C;
    const T* d = dout + static_cast<long>(n) * C;
    for (int c = 0; c < C; ++c) row[c] += d[c];
  }
}

template void embedding_forward<float>(float*, const int32_t*, const float*, int, int);
template void embedding_forward<double>(double*, const int32_t*, const double*, int, int);
template void embedding_backward<float>(float*, const float*, const int32_t*, int, int);
template void embedding_backward<double>(double*, const double*, const int32_t*, int, int);

}  // namespace dmc::kernels
