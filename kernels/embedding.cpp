// Token embedding (spec: kernels/embedding.h): a row lookup, out[n, :] = wte[tokens[n], :].
// The backward scatters each output gradient row back into the table row it came from; a token
// that occurs several times in the batch sums all of its rows (in order n = 0, 1, ...).
#include "kernels/embedding.h"

#include <cassert>

namespace dmc::kernels {
namespace {

// The row of `token` in this rank's part of the table, or -1 when another rank holds it.
long local_row(int32_t token, int vocab_begin, int vocab_rows) {
  assert(token >= 0);
  const long row = static_cast<long>(token) - vocab_begin;
  return row >= 0 && row < vocab_rows ? row : -1;
}

}  // namespace

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int N, int C, int vocab_begin,
                       int vocab_rows) {
  for (int n = 0; n < N; ++n) {
    const long r = local_row(tokens[n], vocab_begin, vocab_rows);
    T* o = out + static_cast<long>(n) * C;
    for (int c = 0; c < C; ++c) o[c] = r < 0 ? T(0) : wte[r * C + c];
  }
}

template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int N, int C,
                        int vocab_begin, int vocab_rows) {
  for (int n = 0; n < N; ++n) {
    const long r = local_row(tokens[n], vocab_begin, vocab_rows);
    if (r < 0) continue;
    T* row = dwte + r * C;
    const T* d = dout + static_cast<long>(n) * C;
    for (int c = 0; c < C; ++c) row[c] += d[c];
  }
}

template void embedding_forward<float>(float*, const int32_t*, const float*, int, int, int, int);
template void embedding_forward<double>(double*, const int32_t*, const double*, int, int, int, int);
template void embedding_backward<float>(float*, const float*, const int32_t*, int, int, int, int);
template void embedding_backward<double>(double*, const double*, const int32_t*, int, int, int,
                                         int);

}  // namespace dmc::kernels
