// DMC compression-ratio loss (model/DMC.md §4). Per layer l and sequence b the merge fraction
// f[l, b] = mean over positions t and KV heads h of merge[l][b, t, h] (hard decisions).
//   mean_merge[b] = mean_l f[l, b]
//   L_CR = (1/B) sum_b relu(prior - mean_merge[b]),   prior = 1 - 1/CR_target
// One-sided: only too little compression is punished. The per-layer accumulation is split from
// the hinge so tensor-parallel ranks can all-reduce mean_merge (each holds a subset of heads)
// before the hinge, which makes the loss independent of the parallel layout.
#pragma once

namespace dmc::kernels {

// mean_merge[b] += scale · sum_{t,h} merge[b, t, h]   with merge [B, T, Hkv];
// the caller passes scale = 1 / (L · T · Hkv_total).
template <typename T>
void cr_accumulate_merge(T* mean_merge, const T* merge, int B, int T_, int Hkv, T scale);

// dmerge[b, t, h] += scale · dmean_merge[b]
template <typename T>
void cr_accumulate_merge_backward(T* dmerge, const T* dmean_merge, int B, int T_, int Hkv,
                                  T scale);

template <typename T>
T cr_loss_forward(const T* mean_merge, int B, T prior);

// dmean_merge[b] += -(dloss / B) · 1[prior > mean_merge[b]]
template <typename T>
void cr_loss_backward(T* dmean_merge, const T* mean_merge, int B, T prior, T dloss);

}  // namespace dmc::kernels
