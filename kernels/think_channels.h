// ThinK (Xu et al., ICLR 2025, arXiv 2407.21018 §3): query-driven pruning of key channels.
//
// For one KV head, observation-window queries Q [S, D] and keys K [n, D] (both after RoPE), the
// importance of channel j is the paper's
//   score_j = || Q[:, j] K[:, j]^T ||_F = ||Q[:, j]||_2 · ||K[:, j]||_2
// (the Frobenius norm of an outer product is the product of the two norms), and the `kept`
// channels with the highest scores are kept (ties to the lower channel); the others are not
// stored. Attention reads q · k over the kept channels only: the paper's query masked by the
// channel mask against the pruned keys (kernels/decode_attention.h).
// GQA (ours): the Q of a KV head stacks the observation queries of every query head of its group,
// so ||Q[:, j]||² = Σ over those queries and heads of q_j²: the cache accumulates that energy per
// channel (query_energy [D]) and never keeps the queries themselves.
//
// The channel mask of a page is ceil(D / 8) bytes: bit j % 8 of byte j / 8 is set when channel j
// is kept. Pruned rows hold the kept channels in increasing channel order.
//
// think_observe_queries: the energy a KV head accumulates from the G query heads q [G, D] of its
// group at one token, energy[j] += q[0, j]² + ... + q[G − 1, j]², added one query head at a time
// in that order (a multiply, then an add: the CUDA version rounds the same way in fp32); channel
// D − 1 gets nothing when exclude_ctrl (DMC's control channel, which attention never reads).
// The CUDA versions (kernels/cuda_ops.h): think_observe_queries over every KV head of a step's
// rows, and think_prune_pages, which closes a batch of pages: for each, think_select_channels on
// its rows and its head's energy, think_prune_rows of its keys, its values whole, and the
// head's energy back to 0 (the next page is scored by the queries that come after this one).
#pragma once

#include <cstdint>

namespace dmc::kernels {

constexpr int ThinkMaskBytes(int D) { return (D + 7) / 8; }
constexpr bool ThinkKept(const uint8_t* mask, int j) { return (mask[j / 8] >> (j % 8)) & 1; }

// The mask of the `kept` channels of keys [n, D] with the highest score_j² =
// query_energy[j] · Σ_i keys[i, j]² (the square ranks as the score does).
template <typename T>
void think_select_channels(uint8_t* mask, const T* query_energy, const T* keys, int n, int D,
                           int kept);

// pruned [n, kept] = the kept channels of rows [n, D], in channel order.
template <typename T>
void think_observe_queries(T* energy, const T* q, int G, int D, bool exclude_ctrl);

template <typename T>
void think_prune_rows(T* pruned, const T* rows, const uint8_t* mask, int n, int D, int kept);

}  // namespace dmc::kernels
