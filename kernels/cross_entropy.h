// Fused softmax + cross-entropy over the vocabulary, one row of V logits per token.
//   losses[n] = logsumexp(logits[n, :]) - logits[n, targets[n]]
// A target < 0 marks a position without a label: its loss is 0 and it gets no gradient.
//
// Vocabulary-parallel form (Megatron's VocabParallelCrossEntropy): a tensor-parallel rank holds
// the logits of the vocabulary rows [vocab_begin, vocab_begin + V) only. Each rank computes its
// shard's statistics (logsumexp of its logits, and the target's logit when the target is one of
// its rows, else 0); the ranks exchange them (an all-gather of 2·N numbers, far less than the
// logits), and every rank combines them into the same losses and the global logsumexp, which its
// backward then needs. The full-vocabulary functions are the one-shard case.
#pragma once
#include <cstdint>

namespace dmc::kernels {

template <typename T>
void cross_entropy_forward(T* losses, const T* logits, const int32_t* targets, int N, int V);

// dlogits[n, :] += dlosses[n] · (softmax(logits[n, :]) - onehot(targets[n])) with accumulate;
// without, = (and rows without a label are set to 0).
template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* targets,
                            const T* dlosses, int N, int V, bool accumulate);

// stats [2, N]: stats[n] = logsumexp of this shard's row n, stats[N + n] = logits[n, target -
// vocab_begin] when the target is in the shard, else 0. Rows without a label get 0, 0.
template <typename T>
void cross_entropy_shard_stats(T* stats, const T* logits, const int32_t* targets, int N, int V,
                               int vocab_begin);

// shard_stats [shards, 2, N] (every shard's stats, in any order) → losses [N] and the global
// logsumexp lse [N] (0 for rows without a label).
template <typename T>
void cross_entropy_combine_shards(T* losses, T* lse, const T* shard_stats,
                                  const int32_t* targets, int N, int shards);

// This shard's dlogits [N, V] += dlosses[n] · (exp(logits - lse[n]) - onehot(target)) with
// accumulate; without, = (and rows without a label are set to 0).
template <typename T>
void cross_entropy_shard_backward(T* dlogits, const T* logits, const T* lse,
                                  const int32_t* targets, const T* dlosses, int N, int V,
                                  int vocab_begin, bool accumulate);

}  // namespace dmc::kernels
