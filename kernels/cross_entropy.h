// Fused softmax + cross-entropy over the vocabulary, one row of V logits per token.
//   losses[n] = logsumexp(logits[n, :]) - logits[n, targets[n]]
// A target < 0 marks a position without a label: its loss is 0 and it gets no gradient.
#pragma once
#include <cstdint>

namespace dmc::kernels {

template <typename T>
void cross_entropy_forward(T* losses, const T* logits, const int32_t* targets, int N, int V);

// dlogits[n, :] += dlosses[n] · (softmax(logits[n, :]) - onehot(targets[n]))
template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* targets,
                            const T* dlosses, int N, int V);

}  // namespace dmc::kernels
