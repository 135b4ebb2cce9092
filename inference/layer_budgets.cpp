#include "inference/layer_budgets.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "absl/strings/str_format.h"

namespace dmc::inference {

std::vector<int> DistributeSlots(const std::vector<double>& weights, long total, int cap) {
  const int L = static_cast<int>(weights.size());
  std::vector<double> share(L, 0.0);
  std::vector<bool> fixed(L, false);
  // Proportional shares of what the unclamped layers have left, until no share leaves [1, cap].
  for (bool clamped = true; clamped;) {
    clamped = false;
    double left = static_cast<double>(total), weight = 0;
    for (int l = 0; l < L; ++l) (fixed[l] ? left -= share[l] : weight += weights[l]);
    for (int l = 0; l < L; ++l)
      if (!fixed[l]) share[l] = left * weights[l] / weight;
    for (int l = 0; l < L; ++l)
      if (!fixed[l] && (share[l] > cap || share[l] < 1)) {
        share[l] = share[l] > cap ? cap : 1;
        fixed[l] = clamped = true;
      }
  }
  std::vector<int> slots(L);
  long given = 0;
  for (int l = 0; l < L; ++l) given += slots[l] = static_cast<int>(std::floor(share[l] + 1e-9));
  std::vector<int> order(L);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return share[a] - slots[a] > share[b] - slots[b];
  });
  for (int i = 0; given < total; i = (i + 1) % L)
    if (slots[order[i]] < cap) ++slots[order[i]], ++given;
  return slots;
}

std::vector<int> PyramidInferBudgets(int layers, int mean_budget, int seq_len) {
  std::vector<double> w(layers);
  double kept = 1.0;
  for (int l = 0; l < layers; ++l) {
    const double r = (1 - kPyramidInferDecay) * (std::cos(M_PI * l / layers) + 1) / 2 +
                     kPyramidInferDecay;
    w[l] = kept *= r;
  }
  return DistributeSlots(w, static_cast<long>(layers) * mean_budget, seq_len);
}

std::vector<int> ZigZagBudgets(const std::vector<double>& lmba, int mean_budget, int seq_len) {
  const int L = static_cast<int>(lmba.size());
  const double sum = std::accumulate(lmba.begin(), lmba.end(), 0.0);
  const double bound = kZigZagBoundRatio * mean_budget;
  std::vector<double> budget(L);
  for (int l = 0; l < L; ++l) budget[l] = bound + (mean_budget - bound) * L * lmba[l] / sum;
  return DistributeSlots(budget, static_cast<long>(L) * mean_budget, seq_len);
}

int LayerMinimumBudget(const std::vector<double>& probs, double tau) {
  std::vector<double> sorted(probs);
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  double mass = 0;
  for (size_t k = 0; k < sorted.size(); ++k)
    if ((mass += sorted[k]) >= tau - 1e-12) return static_cast<int>(k + 1);
  return static_cast<int>(sorted.size());
}

absl::StatusOr<std::vector<double>> CalibrateZigZag(
    model::Llama<float>& model, const std::vector<std::vector<int32_t>>& windows) {
  const model::LlamaConfig& c = model.config();
  if (c.compression_enabled() || model.local_heads() != c.num_attention_heads)
    return absl::InvalidArgumentError(
        "ZigZagKV calibrates on a single-process model without DMC or DMS compression");
  if (windows.empty()) return absl::InvalidArgumentError("ZigZagKV needs calibration windows");
  const int L = c.num_hidden_layers, H = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const int D = c.head_dim(), group = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> lmba(L, 0.0);
  long counted = 0;
  for (const std::vector<int32_t>& w : windows) {
    const int T = static_cast<int>(w.size());
    const std::vector<int32_t> no_targets(T, -1);
    model.Forward(w.data(), no_targets.data(), 1, T, model::StepOptions{});
    const int first = std::max(0, T - kZigZagObservation);
    for (int l = 0; l < L; ++l) {
      const std::vector<float>& q = model.rotated_queries(l);
      const std::vector<float>& k = model.rotated_keys(l);
      for (int t = first; t < T; ++t)
        for (int g = 0; g < H; ++g) {
          const float* qt = q.data() + (size_t(t) * H + g) * D;
          std::vector<double> p(t + 1);
          double max_s = -1e300, sum = 0;
          for (int i = 0; i <= t; ++i) {
            const float* ki = k.data() + (size_t(i) * Hkv + g / group) * D;
            double dot = 0;
            for (int j = 0; j < D; ++j) dot += static_cast<double>(qt[j]) * ki[j];
            max_s = std::max(max_s, p[i] = dot * scale);
          }
          for (double& x : p) sum += (x = std::exp(x - max_s));
          for (double& x : p) x /= sum;
          lmba[l] += LayerMinimumBudget(p, kZigZagAttentionMass);
        }
    }
    counted += static_cast<long>(T - first) * H;
  }
  for (double& x : lmba) x /= counted;
  return lmba;
}

}  // namespace dmc::inference
