#include "inference/engine_agreement.h"

#include <algorithm>
#include <cmath>

namespace dmc::inference {
namespace {

// Slots of every (layer, KV head) of `seq`, [L · Hkv].
std::vector<int> Lengths(const DecodeEngine& e, int seq) {
  const model::LlamaConfig& c = e.config();
  std::vector<int> out(size_t(c.num_hidden_layers) * c.num_key_value_heads);
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int h = 0; h < c.num_key_value_heads; ++h)
      out[size_t(l) * c.num_key_value_heads + h] = e.length(seq, l, h);
  return out;
}

// The decision logits a of the reference model's forward with hard decisions over `inputs`,
// [T, L · Hkv].
std::vector<float> DecisionLogits(model::Llama<float>& model, const std::vector<int32_t>& inputs) {
  const model::LlamaConfig& c = model.config();
  const int T = static_cast<int>(inputs.size()), L = c.num_hidden_layers,
            Hkv = c.num_key_value_heads;
  model::StepOptions hard;
  hard.mode = kernels::DmcDecisionMode::kHard;
  const std::vector<int32_t> no_targets(inputs.size(), -1);
  model.Forward(inputs.data(), no_targets.data(), 1, T, hard);
  std::vector<float> a(size_t(T) * L * Hkv);
  for (int l = 0; l < L; ++l)
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < Hkv; ++h)
        a[(size_t(t) * L + l) * Hkv + h] = model.decision_logits(l)[size_t(t) * Hkv + h];
  return a;
}

}  // namespace

absl::StatusOr<EngineAgreement> CompareEngines(model::Llama<float>& model, DecodeEngine& reference,
                                               DecodeEngine& candidate,
                                               const std::vector<std::vector<int32_t>>& windows,
                                               int max_batch) {
  const model::LlamaConfig& c = reference.config();
  const model::LlamaConfig& cc = candidate.config();
  if (cc.num_hidden_layers != c.num_hidden_layers ||
      cc.num_key_value_heads != c.num_key_value_heads || cc.vocab_size != c.vocab_size)
    return absl::InvalidArgumentError("the two engines run models of different shapes");
  if (reference.policy().method != candidate.policy().method)
    return absl::InvalidArgumentError("the two engines run different cache methods");
  if (max_batch < 1) return absl::InvalidArgumentError("max_batch must be at least 1");
  for (const auto& w : windows)
    if (w.size() < 2)
      return absl::InvalidArgumentError("a window needs at least one input and its target");
  const int L = c.num_hidden_layers, Hkv = c.num_key_value_heads, heads = L * Hkv;
  const bool decisions = reference.policy().method == CacheMethod::kDmc && c.dmc.enabled;
  // bf16's unit at the decision channel's value k[D-1] = a + c
  auto margin = [&](float a) {
    const double unit = std::ldexp(1.0, -8) * std::fabs(double(a) + c.dmc.init_val);
    return std::fabs(a) / std::max(1e-30, unit);
  };

  EngineAgreement r;
  double sum_diff = 0;
  for (size_t g0 = 0; g0 < windows.size(); g0 += max_batch) {
    const int n = static_cast<int>(std::min<size_t>(max_batch, windows.size() - g0));
    std::vector<int> seqs(n);
    std::vector<std::vector<float>> logit_a(n);
    size_t steps = 0;
    for (int i = 0; i < n; ++i) {
      seqs[i] = static_cast<int>(g0) + i;
      const std::vector<int32_t>& w = windows[g0 + i];
      steps = std::max(steps, w.size() - 1);
      if (decisions)
        logit_a[i] = DecisionLogits(model, std::vector<int32_t>(w.begin(), w.end() - 1));
      for (DecodeEngine* e : {&reference, &candidate})
        if (absl::Status s = e->AddSequence(seqs[i], SamplingOptions{}); !s.ok()) return s;
    }
    std::vector<std::vector<int>> ref_len(n, std::vector<int>(heads, 0)), cand_len = ref_len;
    std::vector<bool> flipped(n, false);
    std::vector<TokenOutput> ref_out, cand_out;
    for (size_t t = 0; t < steps; ++t) {
      std::vector<int> active, step_seqs;  // indices into the group, and their sequences
      std::vector<int32_t> tokens, targets;
      for (int i = 0; i < n; ++i)
        if (t + 1 < windows[g0 + i].size()) {
          active.push_back(i);
          step_seqs.push_back(seqs[i]);
          tokens.push_back(windows[g0 + i][t]);
          targets.push_back(windows[g0 + i][t + 1]);
        }
      if (absl::Status s = reference.Step(step_seqs, tokens.data(), targets.data(), &ref_out);
          !s.ok())
        return s;
      if (absl::Status s = candidate.Step(step_seqs, tokens.data(), targets.data(), &cand_out);
          !s.ok())
        return s;
      for (size_t k = 0; k < active.size(); ++k) {
        const int i = active[k];
        const std::vector<int> rl = Lengths(reference, seqs[i]), cl = Lengths(candidate, seqs[i]);
        if (decisions && !flipped[i]) {
          for (int x = 0; x < heads; ++x) {
            ++r.decisions;
            if (rl[x] - ref_len[i][x] != cl[x] - cand_len[i][x]) {
              ++r.flips;
              r.max_flip_margin =
                  std::max(r.max_flip_margin, margin(logit_a[i][t * heads + x]));
              flipped[i] = true;
            }
          }
          r.windows_flipped += flipped[i] ? 1 : 0;
        }
        ref_len[i] = rl;
        cand_len[i] = cl;
        const double diff = std::fabs(double(cand_out[k].logprob) - ref_out[k].logprob);
        r.max_logprob_diff = std::max(r.max_logprob_diff, diff);
        if (!flipped[i])
          r.max_logprob_diff_before_flip = std::max(r.max_logprob_diff_before_flip, diff);
        sum_diff += diff;
        r.argmax_differ += cand_out[k].argmax != ref_out[k].argmax ? 1 : 0;
        ++r.predictions;
      }
    }
    for (int i = 0; i < n; ++i) {
      r.head_tokens += static_cast<long>(reference.tokens(seqs[i])) * heads;
      for (int x = 0; x < heads; ++x) {
        r.reference_slots += ref_len[i][x];
        r.candidate_slots += cand_len[i][x];
      }
      r.reference_bytes += reference.bytes(seqs[i]);
      r.candidate_bytes += candidate.bytes(seqs[i]);
      for (DecodeEngine* e : {&reference, &candidate})
        if (absl::Status s = e->Free(seqs[i]); !s.ok()) return s;
      ++r.windows;
    }
  }
  r.mean_logprob_diff = sum_diff / std::max(1L, r.predictions);
  return r;
}

}  // namespace dmc::inference
