// dmc-eval --model=HF_DIR --data=val_index.json: held-out perplexity, next-token accuracy and the
// achieved compression ratio (overall, per layer, per head, and a PNG heat map of the heads) of a
// DMC model with hard decisions, side by side with the vanilla cache and the H2O and TOVA
// eviction baselines at a matched compression ratio, all over the same paged cache; for a LoMA
// model (config.json with "loma" settings) also its memory compression (--methods=loma).
// --device=cuda decodes dmc, dms, vanilla, h2o, tova and loma token by token on the GPU engine
// (inference/cuda_engine.h), the same figures as the CPU for models too large to decode there
// (with --kv_fraction: every compressor, each budget met by the bytes the GPU engine holds: bf16
// pages and windowed keys and values, fp32 importances);
// with --parallel_forward it computes them by the CUDA model's parallel forward over whole
// windows instead (inference/evaluate_cuda.h), a cross-check of the decoder; with --against_cpu
// it decodes each method on the GPU and CPU engines in lockstep and reports how far they agree
// (inference/engine_agreement.h): log-probabilities, DMC decisions, slots and bytes.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "data/loader.h"
#include "inference/cpu_engine.h"
#include "inference/engine_agreement.h"
#include "inference/evaluate.h"
#include "inference/hf_model.h"
#include "inference/kv_sharer.h"
#include "inference/layer_budgets.h"
#include "inference/paged_decoder.h"
#include "inference/png_writer.h"
#if defined(DMC_HAVE_CUDA)
#include "inference/cuda_engine.h"
#include "inference/evaluate_cuda.h"
#endif

ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint directory (dmc-export output)");
ABSL_FLAG(std::string, data, "", "held-out shard index (val_index.json of dmc-prep)");
ABSL_FLAG(int, seq_len, 256, "tokens per evaluated window");
ABSL_FLAG(int, max_sequences, 32, "windows to evaluate (fewer if the shards hold fewer)");
ABSL_FLAG(std::string, methods, "dmc",
          "comma-separated cache methods: dmc, dms (DMS models only), vanilla, h2o, tova, loma "
          "(LoMA models only)");
ABSL_FLAG(double, baseline_cr, 0.0,
          "compression ratio the h2o/tova budgets are matched to; 0: the CR dmc (or else loma) "
          "achieves in this run (dmc or loma must then be among --methods)");
ABSL_FLAG(int64_t, kv_budget_mb, 256, "KV cache budget in MiB (pages and DMC window state)");
ABSL_FLAG(int, page_size, 16, "slots per KV cache page");
ABSL_FLAG(int, max_batch, 16,
          "sequences decoded concurrently at most (--device=cuda: windows per forward pass)");
ABSL_FLAG(std::string, heatmap, "", "write the per-head CR of dmc as a PNG heat map here");
ABSL_FLAG(std::string, append_tsv, "",
          "append one tab-separated line per method to this file: label, method, budget, CR, "
          "perplexity, accuracy, KV bytes, tokens/s, max batch (for results tables)");
ABSL_FLAG(std::string, device, "cpu",
          "cpu: decode token by token over the paged cache; cuda: dmc, dms, vanilla, h2o, tova and "
          "loma decoded token by token on the GPU engine");
ABSL_FLAG(bool, parallel_forward, false,
          "with --device=cuda: dmc and vanilla by one parallel forward of the CUDA training model "
          "per batch of --max_batch windows instead of decoding (a cross-check)");
ABSL_FLAG(bool, against_cpu, false,
          "with --device=cuda: decode each method on the GPU engine and the CPU engine (its "
          "specification) in lockstep, and print how far they agree instead of the figures: "
          "log-probabilities, argmax, DMC decisions (each flip with its margin in bf16 units), "
          "slots and bytes");
ABSL_FLAG(std::string, label, "", "first column of the --append_tsv lines (default: --model)");
ABSL_FLAG(std::string, kv_fraction, "",
          "comma-separated KV byte budgets per sequence relative to the vanilla cache (1/2,1/4 or "
          "0.5): each method of --methods (vanilla, quant, zipcache, think, h2o, tova, dmc, dms) "
          "gets the knob that meets each budget (bits, salient slots, kept key channels, slots "
          "per head; h2o_pyramid, tova_pyramid, h2o_zigzag, tova_zigzag: mean slots per layer; "
          "kvsharer: shared layers; dmc_think, dms_think: kept key channels of the dmc and dms "
          "caches), "
          "one table per budget; a sequence's bytes are counted as its engine holds them: "
          "pages, full-precision residual, DMC window state and ThinK query energy in fp32 on "
          "the cpu; on cuda pages, residual and DMC's windowed keys and values in bf16, its "
          "importances and ThinK's query energy in fp32");
ABSL_FLAG(int, calibration_sequences, 8,
          "--kv_fraction: held-out windows after the evaluated ones on which the methods that "
          "need a calibration (the _zigzag budgets, kvsharer) calibrate");

namespace {

using dmc::inference::CacheMethod;
using dmc::inference::EvalResult;

// Dark blue (CR 1) → green → yellow (the highest CR of the map).
void HeatColor(double x, uint8_t* rgb) {
  static const double stops[4][3] = {{68, 1, 84}, {49, 104, 142}, {53, 183, 121}, {253, 231, 37}};
  x = std::clamp(x, 0.0, 1.0) * 3;
  const int i = std::min(2, static_cast<int>(x));
  const double f = x - i;
  for (int c = 0; c < 3; ++c)
    rgb[c] = static_cast<uint8_t>(stops[i][c] + f * (stops[i + 1][c] - stops[i][c]) + 0.5);
}

// One cell of cell × cell pixels per (layer row, KV head column); colour on a log scale of CR, so
// 1×, 2×, 4×, ... are evenly spaced up to the map's highest CR.
absl::Status WriteHeatmap(const std::string& path, const EvalResult& r, int L, int Hkv) {
  const int cell = 24;
  const double top = std::max(1.0 + 1e-9, *std::max_element(r.head_cr.begin(), r.head_cr.end()));
  std::vector<uint8_t> rgb(size_t(L) * cell * Hkv * cell * 3);
  for (int y = 0; y < L * cell; ++y)
    for (int x = 0; x < Hkv * cell; ++x)
      HeatColor(std::log(r.head_cr[(y / cell) * Hkv + x / cell]) / std::log(top),
                &rgb[(size_t(y) * Hkv * cell + x) * 3]);
  return dmc::inference::WritePng(path, Hkv * cell, L * cell, rgb);
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmc-eval: %s\n", std::string(s.message()).c_str());
  return 1;
}

#if defined(DMC_HAVE_CUDA)
// The GPU engine of eo's policy, budget and pages, sized for eo.max_batch windows of seq_len.
absl::StatusOr<std::unique_ptr<dmc::inference::CudaEngine>> GpuEngine(
    dmc::model::Llama<float>& model, const dmc::inference::EvalOptions& eo, int seq_len) {
  dmc::inference::CudaEngineOptions o;
  o.policy = eo.policy;
  o.budget_bytes = eo.budget_bytes;
  o.page_size = eo.page_size;
  o.max_batch = eo.max_batch;
  o.max_context = seq_len;
  return dmc::inference::CudaEngine::Create(model, o);
}

// --against_cpu: eo.policy decoded on the GPU engine and on the CPU one in lockstep.
absl::StatusOr<dmc::inference::EngineAgreement> AgreementWithCpu(
    dmc::model::Llama<float>& model, const std::vector<std::vector<int32_t>>& windows,
    const dmc::inference::EvalOptions& eo, int seq_len) {
  auto cpu = dmc::inference::CpuEngine<float>::Create(model, eo.policy, eo.budget_bytes,
                                                      eo.page_size);
  if (!cpu.ok()) return cpu.status();
  auto gpu = GpuEngine(model, eo, seq_len);
  if (!gpu.ok()) return gpu.status();
  return dmc::inference::CompareEngines(model, **cpu, **gpu, windows, eo.max_batch);
}
#endif

// Token-by-token evaluation of eo.policy on the CPU decoder, or on the GPU engine (sized for
// windows of seq_len tokens) when `device` is cuda.
absl::StatusOr<EvalResult> EvaluateOn(const std::string& device, dmc::model::Llama<float>& model,
                                      const std::vector<std::vector<int32_t>>& windows,
                                      const dmc::inference::EvalOptions& eo, int seq_len) {
#if defined(DMC_HAVE_CUDA)
  if (device == "cuda") {
    auto engine = GpuEngine(model, eo, seq_len);
    if (!engine.ok()) return engine.status();
    return dmc::inference::Evaluate(**engine, windows, eo);
  }
#endif
  return dmc::inference::Evaluate(model, windows, eo);
}

// The widths at which EvaluateOn's engine for `device` holds a sequence: {pages, residual blocks
// and DMC's windowed keys and values; DMC's importances and ThinK's query energy}
// (DecodeEngine::element_bytes, state_element_bytes).
std::pair<int, int> EngineElementBytes(const std::string& device) {
#if defined(DMC_HAVE_CUDA)
  if (device == "cuda")
    return {dmc::inference::CudaEngine::kElementBytes,
            dmc::inference::CudaEngine::kStateElementBytes};
#endif
  return {dmc::inference::CpuEngine<float>::kElementBytes,
          dmc::inference::CpuEngine<float>::kStateElementBytes};
}

absl::StatusOr<double> ParseFraction(absl::string_view text) {
  const std::vector<std::string> parts = absl::StrSplit(text, '/');
  double num = 0, den = 1;
  if (parts.size() > 2 || !absl::SimpleAtod(parts[0], &num) ||
      (parts.size() == 2 && !absl::SimpleAtod(parts[1], &den)) || !(num > 0) || !(den > 0) ||
      num / den > 1)
    return absl::InvalidArgumentError(absl::StrFormat(
        "--kv_fraction: \"%s\" is not a fraction in (0, 1] such as 1/4 or 0.25",
        std::string(text)));
  return num / den;
}

// --kv_fraction: vanilla, the reference, once at its full size; every other method at every
// budget with the knob PolicyForBytes sets (dmc and dms first run at full precision to measure
// their slots per head; the _zigzag budgets and kvsharer first calibrate on the calibration
// windows). A setting picked at several budgets is decoded once. A method that no
// setting fits into a budget gets the reason instead of figures, and the run goes on.
// --append_tsv: one line per (budget, method): label, budget ("1" for the reference), method,
// policy, budget bytes, mean and max bytes a sequence held at its end, perplexity, accuracy,
// tokens/s, and a note ("-", or why the budget was not met).
int EvaluateAtBudgets(dmc::model::Llama<float>& model,
                      const std::vector<std::vector<int32_t>>& windows,
                      const std::vector<std::vector<int32_t>>& calibration,
                      const dmc::inference::EvalOptions& base, int seq_len,
                      const std::string& device) {
  namespace inf = dmc::inference;
  const dmc::model::LlamaConfig& c = model.config();
  std::vector<std::pair<std::string, double>> fractions;  // as written, and its value
  for (absl::string_view f : absl::StrSplit(absl::GetFlag(FLAGS_kv_fraction), ',')) {
    absl::StatusOr<double> x = ParseFraction(f);
    if (!x.ok()) return Fail(x.status());
    fractions.push_back({std::string(f), *x});
  }
  const std::vector<std::string> methods = absl::StrSplit(absl::GetFlag(FLAGS_methods), ',');
  const int heads = c.num_hidden_layers * c.num_key_value_heads;
  std::map<std::string, EvalResult> decoded;  // by PolicyName
  auto run = [&](const inf::CachePolicy& policy) -> absl::StatusOr<EvalResult> {
    const std::string name = inf::PolicyName(policy);
    if (auto it = decoded.find(name); it != decoded.end()) return it->second;
    inf::EvalOptions eo = base;
    eo.policy = policy;
    absl::StatusOr<EvalResult> r = EvaluateOn(device, model, windows, eo, seq_len);
    if (r.ok()) decoded[name] = *r;
    return r;
  };
  auto shape_of = [&](const std::string& name) {
    inf::CachePolicy p;
    p.method = *inf::BudgetCacheMethod(name);  // main has parsed every name
    p.quant.bits = 8;  // the settling shape (settle_lag); the knob sets bits or ThinK
    inf::PagedCacheOptions o = inf::CacheOptionsFor(c, p, 0, base.page_size);
    o.quant = {};
    return o;
  };
  // Every budget is planned at the widths the engine holds: fp32 on the CPU; on the GPU bf16
  // pages and windowed keys and values, fp32 importances.
  const auto [page_element_bytes, state_element_bytes] = EngineElementBytes(device);
  const long vanilla_bytes =
      inf::KvSequenceBytes(shape_of("vanilla"), std::vector<int>(heads, seq_len),
                           page_element_bytes, state_element_bytes);

  std::FILE* tsv = nullptr;
  if (const std::string path = absl::GetFlag(FLAGS_append_tsv); !path.empty()) {
    tsv = std::fopen(path.c_str(), "a");
    if (tsv == nullptr) return Fail(absl::NotFoundError(path + ": cannot open for appending"));
  }
  const std::string label =
      absl::GetFlag(FLAGS_label).empty() ? absl::GetFlag(FLAGS_model) : absl::GetFlag(FLAGS_label);
  std::optional<double> reference;  // vanilla's perplexity, when it is among the methods
  auto report = [&](const std::string& fraction, const std::string& method, long budget,
                    const EvalResult& r, const std::string& note) {
    std::printf("%-10s %-20s %12.0f %9.3f %11.4f %10s %9.4f %10.0f\n", method.c_str(),
                inf::PolicyName(r.policy).c_str(), r.mean_sequence_bytes,
                r.mean_sequence_bytes / vanilla_bytes, r.perplexity,
                reference ? absl::StrFormat("%+.1f%%", 100 * (r.perplexity / *reference - 1)).c_str()
                          : "-",
                r.accuracy, r.tokens_per_second);
    if (note != "-") std::printf("  (%s)\n", note.c_str());
    if (tsv != nullptr)
      std::fprintf(tsv, "%s\t%s\t%s\t%s\t%ld\t%.0f\t%ld\t%.4f\t%.4f\t%.1f\t%s\n",
                   label.c_str(), fraction.c_str(), method.c_str(),
                   inf::PolicyName(r.policy).c_str(), budget, r.mean_sequence_bytes,
                   r.max_sequence_bytes, r.perplexity, r.accuracy, r.tokens_per_second,
                   note.c_str());
  };
  auto header = [] {
    std::printf("%-10s %-20s %12s %9s %11s %10s %9s %10s\n", "method", "setting", "KV bytes/seq",
                "/vanilla", "perplexity", "vs vanilla", "accuracy", "tokens/s");
  };

  if (std::count(methods.begin(), methods.end(), "vanilla") > 0) {
    absl::StatusOr<EvalResult> r = run(inf::CachePolicy{CacheMethod::kVanilla});
    if (!r.ok()) return Fail(r.status());
    reference = r->perplexity;
    std::printf("\nthe reference: the vanilla cache at full precision, %ld bytes per sequence of %d "
                "tokens\n", vanilla_bytes, seq_len);
    header();
    report("1", "vanilla", vanilla_bytes, *r, "-");
  }
  std::map<CacheMethod, std::vector<int>> measured;  // dmc, dms caches: slots per head at fp32
  for (const std::string& m : methods) {
    const CacheMethod cache = *inf::BudgetCacheMethod(m);
    if ((cache != CacheMethod::kDmc && cache != CacheMethod::kDms) || measured.count(cache) > 0)
      continue;
    absl::StatusOr<EvalResult> r = run(inf::CachePolicy{cache});
    if (!r.ok()) return Fail(r.status());
    for (double cr : r->head_cr)
      measured[cache].push_back(static_cast<int>(std::ceil(seq_len / cr)));
  }
  inf::LayerCalibration calibrated;  // on the held-out calibration windows
  if (std::any_of(methods.begin(), methods.end(), [](const std::string& m) {
        return absl::EndsWith(m, "_zigzag");
      })) {
    absl::StatusOr<std::vector<double>> lmba = inf::CalibrateZigZag(model, calibration);
    if (!lmba.ok()) return Fail(lmba.status());
    calibrated.lmba = *lmba;
    std::printf("ZigZagKV LMBA per layer (%zu calibration windows):", calibration.size());
    for (double x : calibrated.lmba) std::printf(" %.1f", x);
    std::printf("\n");
  }
  if (std::count(methods.begin(), methods.end(), "kvsharer") > 0) {
    absl::StatusOr<std::vector<std::pair<int, int>>> shared =
        inf::CalibrateKvSharer(model, calibration, base.page_size, inf::kKvSharerSimilarity);
    if (!shared.ok()) return Fail(shared.status());
    calibrated.shared = *shared;
    std::printf("KVSharer pairs (layer reads source), in the order accepted:");
    for (auto [layer, source] : calibrated.shared) std::printf(" %d<-%d", layer, source);
    std::printf("\n");
  }
  for (const auto& [fraction, f] : fractions) {
    const long budget = static_cast<long>(f * vanilla_bytes);
    std::printf("\nKV budget %s of vanilla: %ld bytes per sequence of %d tokens\n",
                fraction.c_str(), budget, seq_len);
    header();
    for (const std::string& m : methods) {
      if (m == "vanilla") continue;
      absl::StatusOr<inf::CachePolicy> policy =
          inf::PolicyForBytes(m, shape_of(m), page_element_bytes, state_element_bytes, seq_len,
                              budget, measured[*inf::BudgetCacheMethod(m)], calibrated,
                              device == "cuda");
      if (!policy.ok()) {
        const std::string why(policy.status().message());
        std::printf("%-10s cannot meet it: %s\n", m.c_str(), why.c_str());
        if (tsv != nullptr)
          std::fprintf(tsv, "%s\t%s\t%s\t-\t%ld\t-\t-\t-\t-\t-\t%s\n", label.c_str(),
                       fraction.c_str(), m.c_str(), budget, why.c_str());
        continue;
      }
      absl::StatusOr<EvalResult> r = run(*policy);
      if (!r.ok()) return Fail(r.status());
      // dmc, dms: their CR varies over sequences, and the knob was set by the mean slots per head
      std::string note = "-";
      if (r->mean_sequence_bytes > budget)
        note = absl::StrFormat("over the budget on average: the knob was set by the mean slots "
                               "per head, but pages are whole per sequence");
      else if (r->max_sequence_bytes > budget)
        note = absl::StrFormat("met on average; one sequence held %ld bytes, its CR below the mean",
                               r->max_sequence_bytes);
      report(fraction, m, budget, *r, note);
    }
  }
  if (tsv != nullptr && std::fclose(tsv) != 0)
    return Fail(absl::InternalError(absl::GetFlag(FLAGS_append_tsv) + ": write failed"));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "dmc-eval --model=HF_DIR --data=val_index.json [--methods=dmc,vanilla,h2o,tova,loma] "
      "[--device=cpu|cuda]");
  absl::ParseCommandLine(argc, argv);
  const std::string model_dir = absl::GetFlag(FLAGS_model), data = absl::GetFlag(FLAGS_data);
  const int seq_len = absl::GetFlag(FLAGS_seq_len);
  if (model_dir.empty() || data.empty())
    return Fail(absl::InvalidArgumentError("--model and --data are required"));
  const std::string device = absl::GetFlag(FLAGS_device);
  if (device != "cpu" && device != "cuda")
    return Fail(absl::InvalidArgumentError("--device=" + device + ": expected cpu or cuda"));
#if !defined(DMC_HAVE_CUDA)
  if (device == "cuda")
    return Fail(absl::InvalidArgumentError(
        "--device=cuda: this dmc-eval was built without the CUDA backend (configure with "
        "-DDMC_CUDA=ON on a machine with the CUDA toolkit)"));
#endif

  const bool at_budgets = !absl::GetFlag(FLAGS_kv_fraction).empty();
  if (at_budgets && device == "cuda" && absl::GetFlag(FLAGS_parallel_forward))
    return Fail(absl::InvalidArgumentError(
        "--kv_fraction decodes token by token: it does not take --parallel_forward"));
  const bool against_cpu = absl::GetFlag(FLAGS_against_cpu);
  if (against_cpu && (device != "cuda" || at_budgets || absl::GetFlag(FLAGS_parallel_forward)))
    return Fail(absl::InvalidArgumentError(
        "--against_cpu compares the GPU engine with the CPU one: it needs --device=cuda, and "
        "takes neither --kv_fraction nor --parallel_forward"));
  std::vector<CacheMethod> methods;
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_methods), ',')) {
    // --kv_fraction: the cache each name decodes with, checked against the model below
    const std::string text(name);
    absl::StatusOr<CacheMethod> m = at_budgets ? dmc::inference::BudgetCacheMethod(text)
                                               : dmc::inference::ParseCacheMethod(text);
    if (!m.ok()) return Fail(m.status());
    methods.push_back(*m);
  }
  // dmc, dms, then loma, first: the first one's achieved CR sets the baselines' budget.
  auto compresses = [](CacheMethod m) {
    return m == CacheMethod::kDmc || m == CacheMethod::kDms || m == CacheMethod::kLoma;
  };
  std::stable_partition(methods.begin(), methods.end(), compresses);
  const bool has_compressor = !methods.empty() && compresses(methods[0]);
  const bool has_loma = std::count(methods.begin(), methods.end(), CacheMethod::kLoma) > 0;
  if (!at_budgets && absl::GetFlag(FLAGS_baseline_cr) <= 0 && !has_compressor &&
      std::any_of(methods.begin(), methods.end(), [](CacheMethod m) {
        return m == CacheMethod::kH2O || m == CacheMethod::kTova;
      }))
    return Fail(absl::InvalidArgumentError(
        "h2o and tova need a budget: pass --baseline_cr or include dmc, dms or loma in "
        "--methods"));

  auto model = dmc::inference::LoadHfModel(model_dir);
  if (!model.ok()) return Fail(model.status());
  const dmc::model::LlamaConfig& c = (*model)->config();
  if (has_loma && !c.loma.enabled())
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "--methods=loma: %s is not a LoMA model (its config.json has no \"loma\" settings)",
        model_dir)));
  if (std::count(methods.begin(), methods.end(), CacheMethod::kDmc) > 0 && !c.dmc.enabled)
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "--methods=dmc: %s is not a DMC model (its config.json has \"dmc\": {\"enabled\": "
        "false}); evaluate it with vanilla, h2o or tova",
        model_dir)));
  if (std::count(methods.begin(), methods.end(), CacheMethod::kDms) > 0 && !c.dms.enabled)
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "--methods=dms: %s is not a DMS model with eviction on (its config.json has no \"dms\" "
        "settings, or \"enabled\": false)",
        model_dir)));
  if (c.dms.enabled && std::any_of(methods.begin(), methods.end(),
                                   [](CacheMethod m) { return m != CacheMethod::kDms; }))
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "%s is a DMS model: it decodes with its own evictions, --methods=dms (evaluate the "
        "baselines on the model it was retrofitted from)",
        model_dir)));
  if (seq_len < 1 || seq_len > c.max_position_embeddings)
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "--seq_len=%d must be in [1, %d] (max_position_embeddings of %s)", seq_len,
        c.max_position_embeddings, model_dir)));
#if defined(DMC_HAVE_CUDA)
  const bool parallel_forward = absl::GetFlag(FLAGS_parallel_forward);
  if (device == "cuda" && parallel_forward)
    for (CacheMethod m : methods)
      if (absl::Status s = dmc::inference::CudaEvalSupports(c, m); !s.ok()) return Fail(s);
#endif

  dmc::data::LoaderOptions lo;
  lo.index_path = data;
  lo.seq_len = seq_len;
  lo.batch_size = 1;
  lo.expected_vocab_size = c.text_vocab_size();
  lo.prefetch = 0;
  auto loader = dmc::data::ShardLoader::Open(lo);
  if (!loader.ok()) return Fail(loader.status());
  const int n = static_cast<int>(
      std::min<int64_t>(absl::GetFlag(FLAGS_max_sequences), (*loader)->batches_per_epoch()));
  const int calibration_n =
      at_budgets ? static_cast<int>(std::min<int64_t>(absl::GetFlag(FLAGS_calibration_sequences),
                                                      (*loader)->batches_per_epoch() - n))
                 : 0;
  if (n < 1)
    return Fail(absl::InvalidArgumentError(
        absl::StrFormat("%s: holds no window of %d tokens", data, seq_len + 1)));
  std::vector<std::vector<int32_t>> windows, calibration;
  std::vector<int32_t> inputs, targets;
  for (int i = 0; i < n + calibration_n; ++i) {
    if (absl::Status s = (*loader)->Next(&inputs, &targets); !s.ok()) return Fail(s);
    inputs.push_back(targets.back());
    (i < n ? windows : calibration).push_back(inputs);
  }
  std::printf("dmc-eval: %s (%d layers, %d heads, %d KV heads, DMC %s%s%s), %d windows of %d "
              "tokens from %s\n",
              model_dir.c_str(), c.num_hidden_layers, c.num_attention_heads,
              c.num_key_value_heads, c.dmc.enabled ? "on" : "off",
              c.dms.enabled ? absl::StrFormat(", DMS %s window %d",
                                              dmc::model::DmsVariantName(c.dms.variant),
                                              c.dms.window)
                                  .c_str()
                            : "",
              c.loma.enabled()
                  ? absl::StrFormat(", LoMA t %d c %d", c.loma.zones.t, c.loma.zones.c).c_str()
                  : "",
              n, seq_len, data.c_str());
  std::fflush(stdout);  // the progress lines below go to stderr; keep the order in a shared log

  if (at_budgets) {
    dmc::inference::EvalOptions eo;
    eo.budget_bytes = absl::GetFlag(FLAGS_kv_budget_mb) << 20;
    eo.page_size = absl::GetFlag(FLAGS_page_size);
    eo.max_batch = absl::GetFlag(FLAGS_max_batch);
    return EvaluateAtBudgets(**model, windows, calibration, eo, seq_len, device);
  }

  std::vector<EvalResult> results;
  double baseline_cr = absl::GetFlag(FLAGS_baseline_cr);
  if (against_cpu) {
    std::printf("\n| method | windows | predictions | max Δ log p | mean Δ log p | max Δ log p "
                "before a flip | argmax differs | DMC decisions | flips (windows) | largest "
                "flip margin (bf16 units) | CR cpu | CR cuda | KV bytes cpu (fp32) | KV bytes "
                "cuda (bf16) |\n|");
    for (int i = 0; i < 14; ++i) std::printf(" --- |");
    std::printf("\n");
  }
  for (CacheMethod m : methods) {
    dmc::inference::EvalOptions eo;
    eo.budget_bytes = absl::GetFlag(FLAGS_kv_budget_mb) << 20;
    eo.page_size = absl::GetFlag(FLAGS_page_size);
    eo.max_batch = absl::GetFlag(FLAGS_max_batch);
    absl::StatusOr<dmc::inference::CachePolicy> policy =
        dmc::inference::PolicyForCr(m, seq_len, baseline_cr > 0 ? baseline_cr : 1.0);
    if (!policy.ok()) return Fail(policy.status());
    eo.policy = *policy;
#if defined(DMC_HAVE_CUDA)
    if (against_cpu) {
      absl::StatusOr<dmc::inference::EngineAgreement> a =
          AgreementWithCpu(**model, windows, eo, seq_len);
      if (!a.ok()) return Fail(a.status());
      const double cr_cpu = double(a->head_tokens) / a->reference_slots,
                   cr_cuda = double(a->head_tokens) / a->candidate_slots;
      std::printf("| %s | %ld | %ld | %.4f | %.5f | %.4f | %ld | %ld | %ld (%ld) | %.1f | %.3f | "
                  "%.3f | %ld | %ld |\n",
                  dmc::inference::CacheMethodName(m), a->windows, a->predictions,
                  a->max_logprob_diff, a->mean_logprob_diff, a->max_logprob_diff_before_flip,
                  a->argmax_differ, a->decisions, a->flips, a->windows_flipped,
                  a->max_flip_margin, cr_cpu, cr_cuda, a->reference_bytes, a->candidate_bytes);
      std::fflush(stdout);
      if (compresses(m) && baseline_cr <= 0) baseline_cr = cr_cpu;
      continue;
    }
#endif
    const auto start = std::chrono::steady_clock::now();
    auto last_line = start;
    eo.progress = [&](long done, long total) {
      const auto now = std::chrono::steady_clock::now();
      if (now - last_line < std::chrono::seconds(10)) return;
      last_line = now;
      const double seconds = std::chrono::duration<double>(now - start).count();
      std::fprintf(stderr, "dmc-eval: %s %ld/%ld predictions, %.0f per second\n",
                   dmc::inference::CacheMethodName(m), done, total, done / seconds);
    };
#if defined(DMC_HAVE_CUDA)
    absl::StatusOr<EvalResult> r = device == "cuda" && parallel_forward
                                       ? dmc::inference::EvaluateCuda(**model, windows, eo)
                                       : EvaluateOn(device, **model, windows, eo, seq_len);
#else
    absl::StatusOr<EvalResult> r = EvaluateOn(device, **model, windows, eo, seq_len);
#endif
    if (!r.ok()) return Fail(r.status());
    if (compresses(m) && baseline_cr <= 0) baseline_cr = r->cr;
    results.push_back(*r);
  }

  if (against_cpu) return 0;
  std::printf("\n%-8s %7s %6s %11s %9s %18s %10s %9s\n", "method", "budget", "CR", "perplexity",
              "accuracy", "KV memory (bytes)", "tokens/s", "max batch");
  for (const EvalResult& r : results)
    std::printf("%-8s %7s %6.2f %11.4f %9.4f %18ld %10.0f %9d\n",
                dmc::inference::CacheMethodName(r.policy.method),
                r.policy.budget ? absl::StrFormat("%d", r.policy.budget).c_str() : "-", r.cr,
                r.perplexity, r.accuracy, r.peak_kv_bytes, r.tokens_per_second,
                r.max_concurrent);
  if (device == "cuda" && absl::GetFlag(FLAGS_parallel_forward))
    std::printf("(--parallel_forward: tokens/s of the parallel forward over whole windows, not a "
                "decode speed; KV memory with every window resident)\n");

  if (const std::string tsv = absl::GetFlag(FLAGS_append_tsv); !tsv.empty()) {
    std::FILE* f = std::fopen(tsv.c_str(), "a");
    if (f == nullptr) return Fail(absl::NotFoundError(tsv + ": cannot open for appending"));
    const std::string label = absl::GetFlag(FLAGS_label).empty() ? model_dir : absl::GetFlag(FLAGS_label);
    for (const EvalResult& r : results)
      std::fprintf(f, "%s\t%s\t%d\t%.4f\t%.4f\t%.4f\t%ld\t%.1f\t%d\n", label.c_str(),
                   dmc::inference::CacheMethodName(r.policy.method), r.policy.budget, r.cr,
                   r.perplexity, r.accuracy, r.peak_kv_bytes, r.tokens_per_second,
                   r.max_concurrent);
    if (std::fclose(f) != 0) return Fail(absl::InternalError(tsv + ": write failed"));
  }

  for (const EvalResult& r : results) {
    if (r.policy.method != CacheMethod::kDmc && r.policy.method != CacheMethod::kDms) continue;
    const char* name = dmc::inference::CacheMethodName(r.policy.method);
    std::printf("\n%s CR per layer:", name);
    for (double x : r.layer_cr) std::printf(" %.2f", x);
    std::printf("\n%s CR per head (rows: layers, columns: KV heads):\n", name);
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      std::printf("  layer %2d:", l);
      for (int h = 0; h < c.num_key_value_heads; ++h)
        std::printf(" %5.2f", r.head_cr[l * c.num_key_value_heads + h]);
      std::printf("\n");
    }
    const std::string heatmap = absl::GetFlag(FLAGS_heatmap);
    if (!heatmap.empty()) {
      if (absl::Status s = WriteHeatmap(heatmap, r, c.num_hidden_layers, c.num_key_value_heads);
          !s.ok())
        return Fail(s);
      std::printf("wrote the per-head CR heat map to %s\n", heatmap.c_str());
    }
  }
  return 0;
}
