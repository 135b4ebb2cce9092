// Logit distillation loss of DMS (model/DMS.md §4): per position n, with student logits s and
// teacher logits u over the vocabulary, p = softmax(s), log p_t = u - lse(u),
//   kl[n] = sum_v p_v (log p_v - log p_t,v)        = KL(student || teacher), temperature 1
//   L_D   = sum_n weight[n] · kl[n]                (weight = 1/count on the positions counted, 0
//                                                   elsewhere: the caller's mean)
// Gradient: d kl[n] / d s_v = p_v (log p_v - log p_t,v - kl[n]); the teacher gets none.
//
// Vocabulary-parallel form, as kernels/cross_entropy.h: a tensor-parallel rank holds the logits of
// its vocabulary rows only, and the global logsumexps lse_s, lse_t [N] (which the cross-entropy
// combine already gives every rank). Each rank sums its rows' terms into partial[n]; the ranks
// all-reduce partial (N numbers, never the logits) into kl; the backward then needs only kl.
#pragma once

namespace dmc::kernels {

// partial[n] = sum over this shard's V rows of p_v (log p_v - log p_t,v), for weight[n] != 0
// (0 elsewhere). s, u [N, V].
template <typename T>
void kl_distill_shard(T* partial, const T* s, const T* u, const T* lse_s, const T* lse_u,
                      const T* weight, int N, int V);

// ds[n, :] += dloss · weight[n] · p_v (log p_v - log p_t,v - kl[n]), kl the all-reduced partials,
// with accumulate; without, = (and rows of weight 0 are set to 0).
template <typename T>
void kl_distill_shard_backward(T* ds, const T* s, const T* u, const T* lse_s, const T* lse_u,
                               const T* kl, const T* weight, T dloss, int N, int V,
                               bool accumulate);

}  // namespace dmc::kernels
