#include "trainer/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <vector>

#include "absl/strings/str_format.h"
#include "model/hf_config.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "parallel/communicator.h"

namespace dmc::trainer {
namespace fs = std::filesystem;

namespace {

// The first field in which two model configs differ ("" when they agree). dmc.enabled and
// dms.enabled are left out: the trainer switches them by phase.
std::string ConfigMismatch(const model::LlamaConfig& a, const model::LlamaConfig& b) {
  const std::pair<const char*, bool> fields[] = {
      // first: a LoMA model also differs in vocab_size, and this says why
      {"loma.t", a.loma.zones.t != b.loma.zones.t},
      {"loma.c", a.loma.zones.c != b.loma.zones.c},
      {"vocab_size", a.vocab_size != b.vocab_size},
      {"hidden_size", a.hidden_size != b.hidden_size},
      {"intermediate_size", a.intermediate_size != b.intermediate_size},
      {"num_hidden_layers", a.num_hidden_layers != b.num_hidden_layers},
      {"num_attention_heads", a.num_attention_heads != b.num_attention_heads},
      {"num_key_value_heads", a.num_key_value_heads != b.num_key_value_heads},
      {"rope_theta", a.rope_theta != b.rope_theta},
      {"rms_norm_eps", a.rms_norm_eps != b.rms_norm_eps},
      {"tie_word_embeddings", a.tie_word_embeddings != b.tie_word_embeddings},
      {"dmc.window", a.dmc.window != b.dmc.window},
      {"dmc.init_val", a.dmc.init_val != b.dmc.init_val},
      {"dmc.temperature", a.dmc.temperature != b.dmc.temperature},
      {"dms.variant", a.dms.variant != b.dms.variant},
      {"dms.window", a.dms.window != b.dms.window},
      {"dms.scale", a.dms.scale != b.dms.scale},
      {"dms.offset", a.dms.offset != b.dms.offset},
      {"dms.temperature", a.dms.temperature != b.dms.temperature},
  };
  for (const auto& [name, differs] : fields)
    if (differs) return name;
  return "";
}

std::string ModelFile(int tp_rank) { return absl::StrFormat("model-tp%d.safetensors", tp_rank); }
std::string OptimFile(int tp_rank) { return absl::StrFormat("optim-tp%d.safetensors", tp_rank); }

absl::Status FsError(const std::string& what, const fs::path& path, const std::error_code& ec) {
  return absl::InternalError(absl::StrFormat("%s: %s: %s", path.string(), what, ec.message()));
}

}  // namespace

Checkpointer::Checkpointer(std::string dir, int keep_last, parallel::Communicator* world,
                           int tp_rank, int tp_size, int dp_rank)
    : dir_(std::move(dir)), keep_last_(keep_last), world_(world), tp_rank_(tp_rank),
      tp_size_(tp_size), dp_rank_(dp_rank) {}

std::string WeightsHash(const std::vector<float>& weights) {
  uint64_t h = 1469598103934665603ULL;
  const auto* bytes = reinterpret_cast<const unsigned char*>(weights.data());
  for (size_t i = 0; i < weights.size() * sizeof(float); ++i) h = (h ^ bytes[i]) * 1099511628211ULL;
  return absl::StrFormat("%016x", h);
}

std::string Checkpointer::StepDirName(int step) { return absl::StrFormat("step_%08d", step); }

absl::Status Checkpointer::Save(const model::Llama<float>& model, const AdamW& optimizer,
                                const TrainingState& state) {
  const bool leader = world_->rank() == 0;
  const std::string name = StepDirName(state.step);
  const fs::path tmp = fs::path(dir_) / (".tmp-" + name);
  absl::Status status = absl::OkStatus();
  std::error_code ec;
  if (leader) {
    fs::remove_all(tmp, ec);  // left over from a save that was interrupted
    if (!fs::create_directories(tmp, ec) && ec) status = FsError("cannot create", tmp, ec);
  }
  if (absl::Status s = parallel::AgreeOnStatus(*world_, status); !s.ok()) return SaveFailed(name, s);

  // Every DP rank takes part: with ZeRO-1 the moments are gathered from the slices.
  status = WriteFiles(tmp, model, optimizer, state);
  // Every rank learns whether every rank wrote its files before any of them is published.
  if (absl::Status s = parallel::AgreeOnStatus(*world_, status); !s.ok()) {
    if (leader) fs::remove_all(tmp, ec);  // best effort: the failure may be the disk itself
    return SaveFailed(name, s);
  }
  faults_.MaybeKillInSave(state.step, FaultPlan::SavePoint::kTensors);
  if (leader) status = Publish(tmp, name, state.step);
  if (absl::Status s = parallel::AgreeOnStatus(*world_, status); !s.ok()) return SaveFailed(name, s);
  return absl::OkStatus();
}

absl::Status Checkpointer::SaveFailed(const std::string& name, const absl::Status& cause) const {
  return absl::Status(cause.code(),
                      absl::StrFormat("checkpoint %s/%s not saved: %s (%s/latest and the "
                                      "checkpoints it names are unchanged)",
                                      dir_, name, cause.message(), dir_));
}

absl::Status Checkpointer::WriteFiles(const fs::path& tmp, const model::Llama<float>& model,
                                      const AdamW& optimizer, const TrainingState& state) const {
  std::vector<float> m, v;
  if (absl::Status s = optimizer.GatherMoments(&m, &v); !s.ok()) return s;
  if (dp_rank_ == 0) {  // every DP replica holds the same state: the first one writes it
    std::vector<model::TensorToWrite> weights, moments;
    const auto& params = model.params();
    for (const auto& spec : model.param_specs()) {
      weights.push_back({spec.name, spec.shape, params.data() + spec.offset});
      moments.push_back({"exp_avg." + spec.name, spec.shape, m.data() + spec.offset});
      moments.push_back({"exp_avg_sq." + spec.name, spec.shape, v.data() + spec.offset});
    }
    if (absl::Status s = model::WriteSafetensors((tmp / ModelFile(tp_rank_)).string(), weights,
                                                 model::DType::kF32);
        !s.ok())
      return s;
    if (absl::Status s = model::WriteSafetensors((tmp / OptimFile(tp_rank_)).string(), moments,
                                                 model::DType::kF32);
        !s.ok())
      return s;
  }
  if (world_->rank() != 0) return absl::OkStatus();
  nlohmann::json j = {{"step", state.step},
                      {"tokens", state.tokens},
                      {"optimizer_step", state.optimizer_step},
                      {"loader_cursor", state.loader_cursor},
                      {"seed", state.seed},
                      {"teacher", state.teacher},
                      {"tp_size", tp_size_}};
  if (absl::Status s = model::WriteFileAtomically((tmp / "trainer.json").string(), j.dump(2));
      !s.ok())
    return s;
  return model::WriteHfConfig((tmp / "config.json").string(), model.config(), model::DType::kF32);
}

absl::Status Checkpointer::Publish(const fs::path& tmp, const std::string& name, int step) const {
  const fs::path final_dir = fs::path(dir_) / name;
  std::error_code ec;
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec) return FsError("cannot rename the finished checkpoint", tmp, ec);
  faults_.MaybeKillInSave(step, FaultPlan::SavePoint::kRenamed);
  if (absl::Status s =
          model::WriteFileAtomically((fs::path(dir_) / "latest").string(), name + "\n");
      !s.ok())
    return s;
  return Prune();
}

absl::Status Checkpointer::Prune() const {
  if (keep_last_ <= 0) return absl::OkStatus();
  std::vector<std::string> steps;
  for (const auto& entry : fs::directory_iterator(dir_))
    if (entry.is_directory() && entry.path().filename().string().rfind("step_", 0) == 0)
      steps.push_back(entry.path().filename().string());
  std::sort(steps.begin(), steps.end());
  std::error_code ec;
  for (size_t i = 0; i + keep_last_ < steps.size(); ++i) {
    fs::remove_all(fs::path(dir_) / steps[i], ec);
    if (ec) return FsError("cannot remove an old checkpoint", fs::path(dir_) / steps[i], ec);
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainingState> Checkpointer::LoadLatest(model::Llama<float>& model,
                                                       AdamW& optimizer) const {
  const fs::path latest = fs::path(dir_) / "latest";
  if (!fs::exists(latest))
    return absl::NotFoundError(latest.string() + ": no checkpoint to resume from (missing 'latest')");
  absl::StatusOr<std::string> name = model::ReadFileToString(latest.string());
  if (!name.ok()) return name.status();
  std::string step_name = *name;
  step_name.erase(std::remove_if(step_name.begin(), step_name.end(), ::isspace), step_name.end());
  const fs::path step_dir = fs::path(dir_) / step_name;
  if (!fs::is_directory(step_dir))
    return absl::NotFoundError(absl::StrFormat("%s names %s, which does not exist", latest.string(),
                                               step_dir.string()));

  absl::StatusOr<model::LlamaConfig> saved = model::ReadHfConfig((step_dir / "config.json").string());
  if (!saved.ok()) return saved.status();
  if (std::string field = ConfigMismatch(*saved, model.config()); !field.empty())
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: checkpoint of a different model config (%s differs from this run's)",
        (step_dir / "config.json").string(), field));

  const std::string trainer_path = (step_dir / "trainer.json").string();
  absl::StatusOr<std::string> text = model::ReadFileToString(trainer_path);
  if (!text.ok()) return text.status();
  TrainingState state;
  try {
    const nlohmann::json j = nlohmann::json::parse(*text);
    if (j.at("tp_size").get<int>() != tp_size_)
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: saved with tensor-parallel size %d, this run uses %d", trainer_path,
          j.at("tp_size").get<int>(), tp_size_));
    state.step = j.at("step").get<int>();
    state.tokens = j.at("tokens").get<int64_t>();
    state.optimizer_step = j.at("optimizer_step").get<int>();
    state.loader_cursor = j.at("loader_cursor").get<std::string>();
    state.seed = j.at("seed").get<uint64_t>();
    state.teacher = j.value("teacher", std::string());
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(trainer_path + ": malformed trainer state: " + e.what());
  }

  auto weights = model::SafetensorsFile::Open((step_dir / ModelFile(tp_rank_)).string());
  if (!weights.ok()) return weights.status();
  auto moments = model::SafetensorsFile::Open((step_dir / OptimFile(tp_rank_)).string());
  if (!moments.ok()) return moments.status();
  // The full moments of this TP rank; the optimizer keeps its ZeRO-1 slice of them.
  std::vector<float> m(model.params().size()), v(model.params().size());
  for (const auto& spec : model.param_specs()) {
    if (absl::Status s = (*weights)->ReadAsFloat(spec.name, spec.shape,
                                                 model.params().data() + spec.offset);
        !s.ok())
      return s;
    if (absl::Status s =
            (*moments)->ReadAsFloat("exp_avg." + spec.name, spec.shape, m.data() + spec.offset);
        !s.ok())
      return s;
    if (absl::Status s = (*moments)->ReadAsFloat("exp_avg_sq." + spec.name, spec.shape,
                                                 v.data() + spec.offset);
        !s.ok())
      return s;
  }
  if (absl::Status s = optimizer.SetMoments(m, v); !s.ok()) return s;
  optimizer.set_step(state.optimizer_step);
  return state;
}

}  // namespace dmc::trainer
