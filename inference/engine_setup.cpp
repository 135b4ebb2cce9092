#include "inference/engine_setup.h"

#include <filesystem>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "inference/cpu_engine.h"
#if defined(DMC_HAVE_CUDA)
#include "inference/cuda_engine.h"
#endif

namespace dmc::inference {

absl::StatusOr<CacheMethod> ChooseCacheMethod(const model::LlamaConfig& config,
                                              const std::string& name,
                                              const std::string& model_dir,
                                              const std::string& allowed) {
  // A DMS model decodes with its own evictions (the dms cache), a DMC model with dmc, a LoMA
  // model with its memory compression.
  const std::string chosen = !name.empty()          ? name
                             : config.dms.enabled   ? "dms"
                             : config.dmc.enabled   ? "dmc"
                             : config.loma.enabled() ? "loma"
                                                    : "vanilla";
  absl::StatusOr<CacheMethod> method = ParseCacheMethod(chosen);
  if (!method.ok()) return method.status();
  bool ok = false;
  for (absl::string_view a : absl::StrSplit(allowed, ',')) ok = ok || a == chosen;
  if (!ok)
    return absl::InvalidArgumentError(
        absl::StrFormat("--method=%s: expected one of %s", chosen, allowed));
  if (*method == CacheMethod::kDmc && !config.dmc.enabled)
    return absl::InvalidArgumentError(absl::StrFormat(
        "--method=dmc: %s is not a DMC model; use --method=vanilla", model_dir));
  if (*method == CacheMethod::kLoma && !config.loma.enabled())
    return absl::InvalidArgumentError(absl::StrFormat(
        "--method=loma: %s is not a LoMA model (its config.json has no \"loma\" settings); use "
        "--method=vanilla",
        model_dir));
  return method;
}

int MaxHeadSlots(const model::LlamaConfig& config, CacheMethod method, int context) {
  return context + (method == CacheMethod::kLoma ? config.loma.zones.t : 0);
}

absl::StatusOr<std::unique_ptr<data::Tokenizer>> ChooseTokenizer(const std::string& spec,
                                                                 const std::string& model_dir,
                                                                 int vocab_size) {
  std::string chosen = spec;
  if (chosen.empty()) {
    const std::filesystem::path sp = std::filesystem::path(model_dir) / "tokenizer.model";
    chosen = std::filesystem::exists(sp) ? sp.string() : "byte";
  }
  absl::StatusOr<std::unique_ptr<data::Tokenizer>> tokenizer = data::LoadTokenizer(chosen);
  if (!tokenizer.ok()) return tokenizer.status();
  // A model may pad its embedding past the tokenizer (many checkpoints round vocab_size up);
  // ids the tokenizer lacks decode to nothing. A tokenizer larger than the embedding would feed
  // ids the model has no row for.
  if ((*tokenizer)->vocab_size() > vocab_size)
    return absl::InvalidArgumentError(absl::StrFormat(
        "tokenizer %s has %d tokens, more than the model in %s has (vocab_size %d)", chosen,
        (*tokenizer)->vocab_size(), model_dir, vocab_size));
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<DecodeEngine>> CreateEngine(model::Llama<float>& model,
                                                           const EngineSpec& spec) {
  if (spec.device == "cuda") {
#if defined(DMC_HAVE_CUDA)
    CudaEngineOptions o;
    o.policy = spec.policy;
    o.budget_bytes = spec.budget_bytes;
    o.page_size = spec.page_size;
    o.max_batch = spec.max_batch;
    o.max_context = spec.max_context;
    auto e = CudaEngine::Create(model, o);
    if (!e.ok()) return e.status();
    if (spec.launch_ahead && (*e)->CanLaunchAhead().ok())
      if (absl::Status s = (*e)->set_launch_ahead(true); !s.ok()) return s;
    return std::unique_ptr<DecodeEngine>(*std::move(e));
#else
    return absl::InvalidArgumentError(
        "--device=cuda: this tool was built without the CUDA backend");
#endif
  }
  if (spec.device != "cpu")
    return absl::InvalidArgumentError("--device=" + spec.device + ": expected cpu or cuda");
  auto e = CpuEngine<float>::Create(model, spec.policy, spec.budget_bytes, spec.page_size);
  if (!e.ok()) return e.status();
  return std::unique_ptr<DecodeEngine>(*std::move(e));
}

}  // namespace dmc::inference
