#include "inference/hf_model.h"

#include <filesystem>

#include "absl/strings/str_format.h"
#include "model/hf_config.h"
#include "model/hf_weights.h"

namespace dmc::inference {

absl::StatusOr<std::unique_ptr<model::Llama<float>>> LoadHfModel(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    return absl::NotFoundError(absl::StrFormat(
        "%s: not a directory (expected a Hugging Face checkpoint written by dmc-export)", dir));
  absl::StatusOr<model::LlamaConfig> config =
      model::ReadHfConfig((std::filesystem::path(dir) / "config.json").string());
  if (!config.ok()) return config.status();
  auto m = std::make_unique<model::Llama<float>>(*config, nullptr);
  if (absl::Status s = model::ImportHfWeights(dir, m.get()); !s.ok()) return s;
  return m;
}

}  // namespace dmc::inference
