#include "trainer/export.h"

#include <algorithm>
#include <filesystem>
#include <memory>
#include <vector>

#include "absl/strings/str_format.h"
#include "model/hf_config.h"
#include "model/llama.h"
#include "nlohmann/json.hpp"

namespace dmc::trainer {
namespace fs = std::filesystem;

absl::StatusOr<std::string> ResolveStepDir(const std::string& checkpoint) {
  const fs::path latest = fs::path(checkpoint) / "latest";
  if (!fs::exists(latest)) {
    if (fs::exists(fs::path(checkpoint) / "trainer.json")) return checkpoint;
    return absl::NotFoundError(checkpoint + ": neither a checkpoint directory with 'latest' nor a "
                                            "step directory with trainer.json");
  }
  absl::StatusOr<std::string> name = model::ReadFileToString(latest.string());
  if (!name.ok()) return name.status();
  std::string step = *name;
  step.erase(std::remove_if(step.begin(), step.end(), ::isspace), step.end());
  return (fs::path(checkpoint) / step).string();
}

absl::Status ExportCheckpoint(const std::string& checkpoint, const std::string& out_dir,
                              model::DType dtype, int64_t max_shard_bytes) {
  absl::StatusOr<std::string> step_dir = ResolveStepDir(checkpoint);
  if (!step_dir.ok()) return step_dir.status();
  const fs::path dir(*step_dir);
  absl::StatusOr<model::LlamaConfig> config = model::ReadHfConfig((dir / "config.json").string());
  if (!config.ok()) return config.status();
  absl::StatusOr<std::string> trainer_json = model::ReadFileToString((dir / "trainer.json").string());
  if (!trainer_json.ok()) return trainer_json.status();
  int tp_size = 1;
  try {
    tp_size = nlohmann::json::parse(*trainer_json).at("tp_size").get<int>();
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError((dir / "trainer.json").string() + ": " + e.what());
  }

  // The full model (TP size 1) gives every tensor's full shape and split dimension.
  model::Llama<float> full(*config, nullptr);
  for (int r = 0; r < tp_size; ++r) {
    const std::string path = (dir / absl::StrFormat("model-tp%d.safetensors", r)).string();
    absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file = model::SafetensorsFile::Open(path);
    if (!file.ok()) return file.status();
    for (const model::ParamSpec& spec : full.param_specs()) {
      if (spec.split_dim < 0 && r > 0) continue;  // replicated: rank 0's copy
      std::vector<int64_t> local = spec.full_shape;
      model::TpSlice slice;  // rank r's part along the split dimension
      if (spec.split_dim >= 0) {
        slice = model::TpShard(spec.full_shape[spec.split_dim], r, tp_size);
        local[spec.split_dim] = slice.size;
      }
      const int64_t rows = local[0], cols = local.size() > 1 ? local[1] : 1;
      std::vector<float> part(static_cast<size_t>(rows * cols));
      if (absl::Status s = (*file)->ReadAsFloat(spec.name, local, part.data()); !s.ok()) return s;
      float* dst = full.params().data() + spec.offset;
      const int64_t full_cols = spec.full_shape.size() > 1 ? spec.full_shape[1] : 1;
      const int64_t row0 = spec.split_dim == 0 ? slice.begin : 0;
      const int64_t col0 = spec.split_dim == 1 ? slice.begin : 0;
      for (int64_t i = 0; i < rows; ++i)
        std::copy(part.begin() + i * cols, part.begin() + (i + 1) * cols,
                  dst + (row0 + i) * full_cols + col0);
    }
  }
  return ExportModel(full, out_dir, dtype, max_shard_bytes);
}

absl::Status ExportModel(const model::Llama<float>& full, const std::string& out_dir,
                         model::DType dtype, int64_t max_shard_bytes) {
  std::vector<model::TensorToWrite> tensors;
  for (const model::ParamSpec& spec : full.param_specs())
    tensors.push_back({spec.name, spec.full_shape, full.params().data() + spec.offset});
  if (absl::Status s = model::WriteShardedSafetensors(out_dir, tensors, dtype, max_shard_bytes);
      !s.ok())
    return s;
  return model::WriteHfConfig((fs::path(out_dir) / "config.json").string(), full.config(), dtype);
}

}  // namespace dmc::trainer
