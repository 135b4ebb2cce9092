#include "inference/cache_policy.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_format.h"
#include "inference/layer_budgets.h"

namespace dmc::inference {

absl::StatusOr<CacheMethod> ParseCacheMethod(std::string_view name) {
  if (name == "dmc") return CacheMethod::kDmc;
  if (name == "dms") return CacheMethod::kDms;
  if (name == "vanilla") return CacheMethod::kVanilla;
  if (name == "h2o") return CacheMethod::kH2O;
  if (name == "tova") return CacheMethod::kTova;
  if (name == "loma") return CacheMethod::kLoma;
  return absl::InvalidArgumentError(absl::StrFormat(
      "unknown cache method \"%s\" (expected dmc, dms, vanilla, h2o, tova or loma)",
      std::string(name)));
}

const char* CacheMethodName(CacheMethod method) {
  switch (method) {
    case CacheMethod::kDmc: return "dmc";
    case CacheMethod::kDms: return "dms";
    case CacheMethod::kVanilla: return "vanilla";
    case CacheMethod::kH2O: return "h2o";
    case CacheMethod::kTova: return "tova";
    case CacheMethod::kLoma: return "loma";
  }
  return "?";
}

absl::StatusOr<CachePolicy> PolicyForCr(CacheMethod method, int seq_len, double cr) {
  CachePolicy p;
  p.method = method;
  if (method != CacheMethod::kH2O && method != CacheMethod::kTova) return p;
  if (!(cr >= 1.0))
    return absl::InvalidArgumentError(absl::StrFormat(
        "the %s budget needs a compression ratio >= 1, got %g", CacheMethodName(method), cr));
  p.budget = std::max(1, static_cast<int>(std::ceil(seq_len / cr - 1e-9)));
  if (method == CacheMethod::kH2O) p.recent = p.budget / 2;
  return p;
}

int LayerBudget(const CachePolicy& policy, int layer) {
  return policy.layer_budget.empty() ? policy.budget : policy.layer_budget[layer];
}

int LayerRecent(const CachePolicy& policy, int layer) {
  if (policy.method != CacheMethod::kH2O) return 0;
  return policy.layer_budget.empty() ? policy.recent : policy.layer_budget[layer] / 2;
}

absl::Status ValidateEvictionBudgets(const CachePolicy& policy, int layers) {
  if (policy.method != CacheMethod::kH2O && policy.method != CacheMethod::kTova)
    return absl::OkStatus();
  if (!policy.layer_budget.empty() && static_cast<int>(policy.layer_budget.size()) != layers)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: %d per-layer budgets for a model of %d layers", PolicyName(policy),
        policy.layer_budget.size(), layers));
  for (int l = 0; l < layers; ++l)
    if (LayerBudget(policy, l) < 1 || LayerRecent(policy, l) < 0 ||
        LayerRecent(policy, l) >= LayerBudget(policy, l))
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s needs a budget >= 1 and a recent window below it, got budget %d, recent %d at "
          "layer %d",
          PolicyName(policy), LayerBudget(policy, l), LayerRecent(policy, l), l));
  return absl::OkStatus();
}

int KvSourceLayer(const CachePolicy& policy, int layer) {
  return policy.kv_source.empty() ? layer : policy.kv_source[layer];
}

absl::Status ValidateKvSharing(const CachePolicy& policy, int layers) {
  if (policy.kv_source.empty()) return absl::OkStatus();
  if (policy.method != CacheMethod::kVanilla || policy.quant.bits > 0 ||
      policy.think_channels > 0)
    return absl::InvalidArgumentError(
        "KVSharer shares the layers of the full-precision vanilla cache only");
  if (static_cast<int>(policy.kv_source.size()) != layers)
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVSharer: %d cache sources for a model of %d layers", policy.kv_source.size(), layers));
  for (int l = 0; l < layers; ++l) {
    const int s = policy.kv_source[l];
    if (s < 0 || s > l || policy.kv_source[s] != s)
      return absl::InvalidArgumentError(absl::StrFormat(
          "KVSharer: layer %d reads the cache of layer %d; a layer reads its own or that of an "
          "earlier layer which keeps its own",
          l, s));
  }
  return absl::OkStatus();
}

std::string PolicyName(const CachePolicy& p) {
  if (!p.kv_source.empty()) {
    int shared = 0;
    for (int l = 0; l < static_cast<int>(p.kv_source.size()); ++l) shared += p.kv_source[l] != l;
    return absl::StrFormat("kvsharer-%d", shared);
  }
  std::string name = CacheMethodName(p.method);
  if (p.think_channels > 0)
    return p.method == CacheMethod::kVanilla
               ? absl::StrFormat("think-k%d", p.think_channels)
               : absl::StrFormat("%s-think-k%d", name, p.think_channels);
  if (p.allocation == LayerAllocation::kPyramidInfer) name += "-pyramid";
  if (p.allocation == LayerAllocation::kZigZag) name += "-zigzag";
  if (p.budget > 0) name += absl::StrFormat("-%d", p.budget);
  if (p.quant.bits > 0 && p.quant.salient_slots > 0)
    return name + absl::StrFormat("-zip%d/%dx%d", p.quant.salient_bits, p.quant.bits,
                                  p.quant.salient_slots);
  if (p.quant.bits > 0 && p.quant.token_keys)
    return name + absl::StrFormat("-int%d-token", p.quant.bits) +
           (p.quant.key_group > 0 ? absl::StrFormat("-g%d", p.quant.key_group) : "");
  if (p.quant.bits > 0) return name + absl::StrFormat("-int%d", p.quant.bits);
  return name;
}

absl::Status ValidatePageSize(int page_size) {
  if (page_size < 1)
    return absl::InvalidArgumentError(
        absl::StrFormat("page_size %d: a page holds one slot at least", page_size));
  return absl::OkStatus();
}

absl::Status ValidateKvQuant(const CachePolicy& policy, int head_dim, int page_size) {
  const kernels::KvQuantOptions& q = policy.quant;
  if (q.bits == 0) {
    if (q.salient_slots != 0)
      return absl::InvalidArgumentError("ZipCache's salient slots need a quantized cache (bits)");
    if (q.token_keys || q.key_group != 0)
      return absl::InvalidArgumentError("per-token keys need a quantized cache (bits)");
    return absl::OkStatus();
  }
  const char* method = CacheMethodName(policy.method);
  if (policy.method != CacheMethod::kVanilla && policy.method != CacheMethod::kDmc &&
      policy.method != CacheMethod::kDms)
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV quantization serves the vanilla, dmc and dms caches, not %s (its quantized pages "
        "never move, and %s removes slots from within a head)",
        method, method));
  for (int bits : {q.bits, q.salient_slots > 0 ? q.salient_bits : 8})
    if ((bits != 2 && bits != 4 && bits != 8) || head_dim * bits % 8 != 0)
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: KV quantization to %d bits: expected 2, 4 or 8 bits with head_dim (%d) x bits a "
          "whole number of bytes",
          PolicyName(policy), bits, head_dim));
  if (q.value_group < 0 || (q.value_group > 0 && head_dim % q.value_group != 0))
    return absl::InvalidArgumentError(absl::StrFormat(
        "value group of %d channels does not divide head_dim %d", q.value_group, head_dim));
  if (q.key_group != 0 && !q.token_keys)
    return absl::InvalidArgumentError(absl::StrFormat(
        "a key group of %d channels needs per-token keys (%s): per channel, a key's group is "
        "its channel over a page",
        q.key_group, PolicyName(policy)));
  if (q.key_group < 0 || (q.key_group > 0 && head_dim % q.key_group != 0))
    return absl::InvalidArgumentError(absl::StrFormat(
        "per-token keys (%s): key group of %d channels does not divide head_dim %d",
        PolicyName(policy), q.key_group, head_dim));
  if (q.token_keys && q.salient_slots > 0)
    return absl::InvalidArgumentError(
        "ZipCache's mixed precision ranks a page's slots together, so it does not compose with "
        "per-token keys, which quantize each slot as it settles");
  if (q.salient_slots < 0 || q.salient_slots > page_size)
    return absl::InvalidArgumentError(absl::StrFormat(
        "ZipCache: %d salient slots per page of %d slots", q.salient_slots, page_size));
  if (q.salient_slots > 0 && policy.method != CacheMethod::kVanilla)
    return absl::InvalidArgumentError(absl::StrFormat(
        "ZipCache's mixed precision serves the vanilla cache, not %s", method));
  if (q.salient_slots > 0 && q.salient_bits <= q.bits)
    return absl::InvalidArgumentError(absl::StrFormat(
        "ZipCache: salient tokens at %d bits must have more bits than the others (%d)",
        q.salient_bits, q.bits));
  return absl::OkStatus();
}

absl::Status ValidateGpuKvQuant(const CachePolicy& policy) {
  if (!policy.quant.token_keys || policy.method != CacheMethod::kDms) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s: the GPU engine settles DMS's slots a page at a time, past its eviction window; per-token "
      "keys on the dms cache, each slot quantized as it settles, run on the CPU engine",
      PolicyName(policy)));
}

absl::Status ValidateThink(const CachePolicy& policy, int head_dim) {
  if (policy.think_channels == 0) return absl::OkStatus();
  const char* method = CacheMethodName(policy.method);
  if (policy.method != CacheMethod::kVanilla && policy.method != CacheMethod::kDmc &&
      policy.method != CacheMethod::kDms)
    return absl::InvalidArgumentError(absl::StrFormat(
        "ThinK prunes the key channels of the vanilla, dmc and dms caches, not of %s (its pruned "
        "pages never move, and %s removes slots from within a head)",
        method, method));
  if (policy.quant.bits > 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "ThinK prunes pages at full precision: it does not compose with KV quantization (%s)",
        PolicyName(CachePolicy{policy.method, 0, 0, policy.quant})));
  if (policy.think_channels < 0 || policy.think_channels > head_dim)
    return absl::InvalidArgumentError(absl::StrFormat(
        "ThinK keeps %d key channels of head_dim %d: expected 1 to %d", policy.think_channels,
        head_dim, head_dim));
  return absl::OkStatus();
}

namespace {

// "h2o_pyramid" → (h2o, kPyramidInfer); a plain method name → kUniform.
std::pair<std::string_view, LayerAllocation> SplitAllocation(std::string_view name) {
  for (auto [suffix, allocation] : {std::pair{std::string_view("_pyramid"),
                                              LayerAllocation::kPyramidInfer},
                                    std::pair{std::string_view("_zigzag"),
                                              LayerAllocation::kZigZag}})
    if (name.size() > suffix.size() && name.substr(name.size() - suffix.size()) == suffix)
      return {name.substr(0, name.size() - suffix.size()), allocation};
  return {name, LayerAllocation::kUniform};
}

}  // namespace

absl::StatusOr<CacheMethod> BudgetCacheMethod(std::string_view name) {
  if (name == "quant" || name == "zipcache" || name == "think" || name == "kvsharer")
    return CacheMethod::kVanilla;
  if (name == "dmc_think") return CacheMethod::kDmc;
  if (name == "dms_think") return CacheMethod::kDms;
  const auto [base, allocation] = SplitAllocation(name);
  absl::StatusOr<CacheMethod> method = ParseCacheMethod(base);
  if (method.ok() && allocation != LayerAllocation::kUniform && *method != CacheMethod::kH2O &&
      *method != CacheMethod::kTova)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: per-layer budgets (_pyramid, _zigzag) serve h2o and tova only", std::string(name)));
  return method;
}

absl::StatusOr<CachePolicy> PolicyForBytes(std::string_view method,
                                           const PagedCacheOptions& shape,
                                           int page_element_bytes, int state_element_bytes,
                                           int seq_len, long budget_bytes,
                                           const std::vector<int>& head_slots,
                                           const LayerCalibration& calibration, bool gpu) {
  const bool quant = method == "quant", zipcache = method == "zipcache", think = method == "think";
  const bool kvsharer = method == "kvsharer";
  const bool think_composed = method == "dmc_think" || method == "dms_think";
  const LayerAllocation allocation = SplitAllocation(method).second;
  absl::StatusOr<CacheMethod> parsed = BudgetCacheMethod(method);
  if (!parsed.ok()) return parsed.status();
  if (allocation == LayerAllocation::kZigZag &&
      static_cast<int>(calibration.lmba.size()) != shape.layers)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: ZigZagKV needs the LMBA of every layer from a calibration (%d layers, got %d)",
        std::string(method), shape.layers, calibration.lmba.size()));
  const int heads = shape.layers * shape.kv_heads, P = shape.page_size;
  // Candidates from the least compressed on, each with the slots its heads hold.
  std::vector<std::pair<CachePolicy, std::vector<int>>> candidates;
  CachePolicy base;
  base.method = *parsed;
  const std::vector<int> whole(heads, seq_len);
  switch (*parsed) {
    case CacheMethod::kVanilla:
      if (!quant && !zipcache && !think && !kvsharer) candidates.push_back({base, whole});
      for (int bits : {8, 4, 2}) {
        if (!quant) break;
        base.quant = {bits, 0, 0, 0};
        candidates.push_back({base, whole});
      }
      for (auto [high, low] : {std::pair{8, 4}, std::pair{4, 2}})
        for (int salient = P - 1; zipcache && salient >= 1; --salient) {
          base.quant = {low, 0, high, salient};
          candidates.push_back({base, whole});
        }
      for (size_t shared = 0; kvsharer && shared <= calibration.shared.size(); ++shared) {
        base.kv_source.resize(shape.layers);
        std::iota(base.kv_source.begin(), base.kv_source.end(), 0);
        std::vector<int> slots = whole;  // a shared layer stores nothing
        for (size_t i = 0; i < shared; ++i) {
          const auto [layer, source] = calibration.shared[i];
          base.kv_source[layer] = source;
          std::fill_n(slots.begin() + layer * shape.kv_heads, shape.kv_heads, 0);
        }
        candidates.push_back({base, slots});
      }
      for (int kept = shape.head_dim; think && kept >= 1; --kept) {
        base.think_channels = kept;
        candidates.push_back({base, whole});
      }
      break;
    case CacheMethod::kH2O:
    case CacheMethod::kTova:
      for (int budget = seq_len; budget >= 1; --budget) {
        base.budget = budget;
        base.recent = *parsed == CacheMethod::kH2O ? budget / 2 : 0;
        base.allocation = allocation;
        if (allocation == LayerAllocation::kPyramidInfer)
          base.layer_budget = PyramidInferBudgets(shape.layers, budget, seq_len);
        if (allocation == LayerAllocation::kZigZag)
          base.layer_budget = ZigZagBudgets(calibration.lmba, budget, seq_len);
        std::vector<int> slots(heads);
        for (int i = 0; i < heads; ++i) slots[i] = LayerBudget(base, i / shape.kv_heads);
        candidates.push_back({base, slots});
      }
      break;
    case CacheMethod::kDmc:
    case CacheMethod::kDms:
      if (static_cast<int>(head_slots.size()) != heads)
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: its slots per head at full precision are needed (%d heads, got %d)",
            CacheMethodName(*parsed), heads, head_slots.size()));
      // Per channel, then per token (fewer bytes: a residual of settle_lag + 1 rows) at each bits.
      for (int bits : {0, 8, 4, 2})
        for (bool token_keys : {false, true})
          if (!think_composed && (bits > 0 || !token_keys)) {
            base.quant = {bits, 0, 0, 0, token_keys};
            candidates.push_back({base, head_slots});
          }
      for (int kept = shape.head_dim; think_composed && kept >= 1; --kept) {
        base.think_channels = kept;
        candidates.push_back({base, head_slots});
      }
      break;
    case CacheMethod::kLoma:
      return absl::InvalidArgumentError(
          "loma compresses by the (t, c) the model was trained with: no byte budget knob");
  }
  long smallest = -1;
  CachePolicy smallest_policy;
  for (const auto& [policy, slots] : candidates) {
    if (gpu && !ValidateGpuKvQuant(policy).ok()) continue;  // a setting the GPU engine refuses
    PagedCacheOptions o = shape;
    o.quant = policy.quant;
    o.think_channels = policy.think_channels;
    const long bytes = KvSequenceBytes(o, slots, page_element_bytes, state_element_bytes);
    if (bytes <= budget_bytes) return policy;
    if (smallest < 0 || bytes < smallest) smallest = bytes, smallest_policy = policy;
  }
  // What the smallest cache spends its bytes on, so the reader sees which fixed cost is in the way.
  PagedCacheOptions o = shape;
  o.quant = smallest_policy.quant;
  o.think_channels = smallest_policy.think_channels;
  return absl::InvalidArgumentError(absl::StrFormat(
      "no setting of %s meets %d bytes per sequence of %d tokens: its smallest cache, %s, holds "
      "%d (pages %d, full-precision residual %d, DMC window state %d, ThinK query energy %d)",
      std::string(method), budget_bytes, seq_len, PolicyName(smallest_policy), smallest,
      smallest - KvReservedBytes(o, page_element_bytes, state_element_bytes),
      KvResidualBytes(o, page_element_bytes), KvWindowBytes(o, page_element_bytes, state_element_bytes),
      KvObservationBytes(o, state_element_bytes)));
}

namespace {

// The slot with the lowest score among the candidates, ties to the oldest position; -1 if none.
template <typename Score, typename Candidate>
int ArgminSlot(int n, const Score& score, const Candidate& candidate,
               const std::vector<int32_t>& positions) {
  int best = -1;
  for (int i = 0; i < n; ++i) {
    if (!candidate(i)) continue;
    if (best < 0 || score(i) < score(best) ||
        (score(i) == score(best) && positions[i] < positions[best]))
      best = i;
  }
  return best;
}

template <typename T>
std::vector<int32_t> Positions(const PagedKvCache<T>& cache, int seq, int layer, int h) {
  std::vector<int32_t> p(cache.length(seq, layer, h));
  for (int i = 0; i < static_cast<int>(p.size()); ++i) p[i] = cache.position(seq, layer, h, i);
  return p;
}

}  // namespace

template <typename T>
void AccumulateAttention(PagedKvCache<T>& cache, int seq, int layer, const T* probs,
                         int probs_stride, int H) {
  const int Hkv = cache.options().kv_heads, group = H / Hkv;
  for (int h = 0; h < Hkv; ++h)
    for (int i = 0; i < cache.length(seq, layer, h); ++i)
      for (int g = h * group; g < (h + 1) * group; ++g)
        cache.score(seq, layer, h, i) += static_cast<float>(probs[g * probs_stride + i]);
}

template <typename T>
absl::Status H2OUpdate(PagedKvCache<T>& cache, int seq, int layer, int t, const T* probs,
                       int probs_stride, int H, const CachePolicy& policy) {
  AccumulateAttention(cache, seq, layer, probs, probs_stride, H);
  const int budget = LayerBudget(policy, layer), recent = LayerRecent(policy, layer);
  for (int h = 0; h < cache.options().kv_heads; ++h) {
    while (cache.length(seq, layer, h) > budget) {
      const std::vector<int32_t> pos = Positions(cache, seq, layer, h);
      const int victim = ArgminSlot(
          static_cast<int>(pos.size()), [&](int i) { return cache.score(seq, layer, h, i); },
          [&](int i) { return pos[i] <= t - recent; }, pos);
      if (victim < 0)
        return absl::InternalError(
            absl::StrFormat("h2o: no evictable slot (budget %d, recent %d)", budget, recent));
      if (absl::Status s = cache.Evict(seq, layer, h, victim); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status TovaUpdate(PagedKvCache<T>& cache, int seq, int layer, const T* probs,
                        int probs_stride, int H, const CachePolicy& policy) {
  const int Hkv = cache.options().kv_heads;
  // Heads of a layer hold the same tokens in the same slots: TOVA appends and evicts them together.
  const int n = cache.length(seq, layer, 0);
  std::vector<double> mean(n, 0.0);
  for (int g = 0; g < H; ++g)
    for (int i = 0; i < n; ++i) mean[i] += probs[g * probs_stride + i] / H;
  while (cache.length(seq, layer, 0) > LayerBudget(policy, layer)) {
    const std::vector<int32_t> pos = Positions(cache, seq, layer, 0);
    const int victim = ArgminSlot(
        static_cast<int>(pos.size()), [&](int i) { return mean[i]; }, [](int) { return true; },
        pos);
    for (int h = 0; h < Hkv; ++h)
      if (absl::Status s = cache.Evict(seq, layer, h, victim); !s.ok()) return s;
    mean[victim] = mean.back();  // mirror the cache's move of the last slot into the hole
    mean.pop_back();
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status DmsUpdate(PagedKvCache<T>& cache, int seq, int layer, int h, int t,
                       bool evict_previous, int window) {
  const int leaving = t - window - 1;  // w + 1 steps after its mark, a marked token is gone
  int leaving_slot = -1;
  for (int i = 0; i < cache.length(seq, layer, h); ++i) {
    const int32_t pos = cache.position(seq, layer, h, i);
    if (pos == t - 1 && evict_previous) cache.score(seq, layer, h, i) = 1.0f;
    if (pos == leaving && cache.score(seq, layer, h, i) > 0) leaving_slot = i;
  }
  return leaving_slot < 0 ? absl::OkStatus() : cache.Evict(seq, layer, h, leaving_slot);
}

template absl::Status DmsUpdate<float>(PagedKvCache<float>&, int, int, int, int, bool, int);
template absl::Status DmsUpdate<double>(PagedKvCache<double>&, int, int, int, int, bool, int);
template void AccumulateAttention<float>(PagedKvCache<float>&, int, int, const float*, int,
                                         int);
template void AccumulateAttention<double>(PagedKvCache<double>&, int, int, const double*, int,
                                          int);
template absl::Status H2OUpdate<float>(PagedKvCache<float>&, int, int, int, const float*, int,
                                       int, const CachePolicy&);
template absl::Status H2OUpdate<double>(PagedKvCache<double>&, int, int, int, const double*, int,
                                        int, const CachePolicy&);
template absl::Status TovaUpdate<float>(PagedKvCache<float>&, int, int, const float*, int, int,
                                        const CachePolicy&);
template absl::Status TovaUpdate<double>(PagedKvCache<double>&, int, int, const double*, int, int,
                                         const CachePolicy&);

}  // namespace dmc::inference
