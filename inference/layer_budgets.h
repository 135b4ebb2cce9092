// Per-layer slot budgets for the eviction baselines (H2O, TOVA), each at the same total slots as
// the uniform budget B (Σ_l budget_l = L·B, each in [1, seq_len]), and the held-out calibration
// they need.
//
// PyramidInfer (Yang et al., ACL 2024, arXiv 2405.12532): the context a layer retains shrinks
// layer by layer. Layer l keeps a fraction r_l of what layer l−1 kept, with the released code's
// cosine schedule r_l = (1 − d)(cos(π l / L) + 1) / 2 + d, d = 0.9 (its prefill decay ratio), so
// budget_l ∝ w_l = Π_{i <= l} r_i.
//
// ZigZagKV (Zhong et al., COLING 2025, arXiv 2412.09036): a layer's uncertainty is its LMBA, the
// least number of tokens whose attention sums to a fraction τ of the observation queries'
// attention (per query head, averaged over the heads and queries of the layer); with
// u_l = LMBA_l / Σ LMBA (Eq. 6) budget_l = B_bound + (B − B_bound) · L · u_l, B_bound = β·B.
//
// Budgets are whole slots: DistributeSlots rounds the real shares by largest remainder, clamps
// to [1, seq_len] and passes a clamped layer's excess to the others, keeping the total.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama.h"

namespace dmc::inference {

constexpr double kPyramidInferDecay = 0.9;  // d
constexpr double kZigZagAttentionMass = 0.9;  // τ (ours: the paper's value is not at hand)
constexpr double kZigZagBoundRatio = 0.2;     // β (ours, likewise)
constexpr int kZigZagObservation = 8;         // observation queries at the end of each window

// `total` slots over layers in proportion to weights (> 0), each in [1, cap], summing to total.
// Requires L <= total <= L · cap.
std::vector<int> DistributeSlots(const std::vector<double>& weights, long total, int cap);

// PyramidInfer's budgets at mean B per layer over sequences of seq_len tokens.
std::vector<int> PyramidInferBudgets(int layers, int mean_budget, int seq_len);

// ZigZagKV's budgets from each layer's LMBA at mean B.
std::vector<int> ZigZagBudgets(const std::vector<double>& lmba, int mean_budget, int seq_len);

// LMBA of one query head's attention weights p[0..n) (summing to 1): the fewest weights, largest
// first, whose sum reaches τ.
int LayerMinimumBudget(const std::vector<double>& probs, double tau);

// ZigZagKV's calibration: every layer's LMBA, averaged over the query heads and the last
// kZigZagObservation queries of each window (tokens [seq_len], a model without compression,
// single process), from the causal attention of its forward pass.
absl::StatusOr<std::vector<double>> CalibrateZigZag(
    model::Llama<float>& model, const std::vector<std::vector<int32_t>>& windows);

}  // namespace dmc::inference
