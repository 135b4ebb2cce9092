// Token embedding lookup: out[n, :] = wte[tokens[n], :] for wte [V, C].
//
// Vocabulary-parallel form (Megatron's VocabParallelEmbedding): a tensor-parallel rank holds only
// the rows [vocab_begin, vocab_begin + vocab_rows) of the table, as wte [vocab_rows, C]. Tokens
// outside that range give zero rows in the forward (the rank that holds them adds them in the
// all-reduce that follows) and no gradient in the backward. The defaults are the whole table.
#pragma once
#include <climits>
#include <cstdint>

namespace dmc::kernels {

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int N, int C,
                       int vocab_begin = 0, int vocab_rows = INT_MAX);

// dwte[tokens[n] - vocab_begin, :] += dout[n, :] for the tokens of this rank's rows. Always adds
// (a scatter reaches only the rows of the tokens present): as the first writer of dwte, the caller
// zeroes it first.
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int N, int C,
                        int vocab_begin = 0, int vocab_rows = INT_MAX);

}  // namespace dmc::kernels
