// KVSharer (Yang et al., arXiv 2410.18517): layers whose caches are most DISsimilar share one.
//
// Calibration on held-out windows, §3 of the paper:
//   1. every layer's KV cache of each window (its rotated keys and its values, flattened) is
//      averaged over the windows, and every pair of layers (s < l) is ranked by the Euclidean
//      distance between their averages, the largest first;
//   2. in that order, a pair is tried: layer l stops storing its cache and its attention reads
//      layer s's (a layer already sharing, or already a source, is skipped); the pair is kept if
//      the model with every kept pair still agrees with the original on the calibration windows,
//      cosine similarity of the outputs >= the threshold; until L − 1 layers share or the pairs
//      run out.
// Ours: the outputs compared are the logits at every position of the windows, decoded token by
// token through the paged cache (the paper: the last layer's hidden states), and the threshold is
// kKvSharerSimilarity; the later layer of a pair reads the earlier one's cache, so that a token's
// keys exist before the layer that shares them runs.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama.h"

namespace dmc::inference {

constexpr double kKvSharerSimilarity = 0.9;

// The Euclidean distance between the window-averaged KV caches of every pair of layers, [L, L].
absl::StatusOr<std::vector<double>> KvSharerLayerDistances(
    model::Llama<float>& model, const std::vector<std::vector<int32_t>>& windows);

// The accepted (layer, source) pairs, in the order accepted.
absl::StatusOr<std::vector<std::pair<int, int>>> CalibrateKvSharer(
    model::Llama<float>& model, const std::vector<std::vector<int32_t>>& windows, int page_size,
    double threshold);

}  // namespace dmc::inference
