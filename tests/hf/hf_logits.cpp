// hf_logits: the engine's side of the Hugging Face logits check (tests/hf/check_hf_logits.py).
//
//   hf_logits write-random OUT_DIR SEED   a random GQA Llama (untied, fp32) in HF layout, written by
//                                         the same writers dmc-export uses
//   hf_logits logits HF_DIR TOKENS OUT    imports HF_DIR as dmc-train --init_from does, runs the
//                                         forward pass with DMC off on the comma-separated TOKENS
//                                         (one sequence) and writes the logits [T, V] as raw
//                                         little-endian float32 to OUT
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "model/hf_config.h"
#include "model/hf_weights.h"
#include "model/llama.h"
#include "model/safetensors.h"

namespace {

using dmc::model::Llama;
using dmc::model::LlamaConfig;

absl::Status WriteRandom(const std::string& dir, uint64_t seed) {
  LlamaConfig c;
  c.vocab_size = 259;
  c.hidden_size = 128;
  c.intermediate_size = 320;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 256;
  c.rope_theta = 10000.0f;
  if (absl::Status s = c.Validate(); !s.ok()) return s;
  Llama<float> model(c, nullptr);
  model.InitRandom(seed);
  std::vector<dmc::model::TensorToWrite> tensors;
  for (const dmc::model::ParamSpec& spec : model.param_specs())
    tensors.push_back({spec.name, spec.full_shape, model.params().data() + spec.offset});
  if (absl::Status s = dmc::model::WriteShardedSafetensors(dir, tensors, dmc::model::DType::kF32,
                                                          int64_t{1} << 40);
      !s.ok())
    return s;
  return dmc::model::WriteHfConfig(dir + "/config.json", c, dmc::model::DType::kF32);
}

absl::Status Logits(const std::string& dir, const std::string& token_list, const std::string& out) {
  absl::StatusOr<LlamaConfig> config = dmc::model::ReadHfConfig(dir + "/config.json");
  if (!config.ok()) return config.status();
  config->dmc.enabled = false;
  std::vector<int32_t> tokens;
  for (absl::string_view t : absl::StrSplit(token_list, ',')) {
    int32_t id;
    if (!absl::SimpleAtoi(t, &id) || id < 0 || id >= config->vocab_size)
      return absl::InvalidArgumentError("bad token id '" + std::string(t) + "'");
    tokens.push_back(id);
  }
  Llama<float> model(*config, nullptr);
  if (absl::Status s = dmc::model::ImportHfWeights(dir, &model); !s.ok()) return s;
  const std::vector<int32_t> no_targets(tokens.size(), -1);
  model.Forward(tokens.data(), no_targets.data(), 1, static_cast<int>(tokens.size()), {});
  std::ofstream f(out, std::ios::binary);
  f.write(reinterpret_cast<const char*>(model.logits().data()),
          static_cast<std::streamsize>(model.logits().size() * sizeof(float)));
  if (!f) return absl::InternalError(out + ": write failed");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  absl::Status status = absl::InvalidArgumentError(
      "usage: hf_logits write-random OUT_DIR SEED | hf_logits logits HF_DIR TOKENS OUT");
  uint64_t seed = 0;
  if (mode == "write-random" && argc == 4 && absl::SimpleAtoi(argv[3], &seed))
    status = WriteRandom(argv[2], seed);
  else if (mode == "logits" && argc == 5)
    status = Logits(argv[2], argv[3], argv[4]);
  if (!status.ok()) {
    std::fprintf(stderr, "hf_logits: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
