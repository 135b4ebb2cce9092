// Hugging Face config.json for Llama models, in and out.
//
// Reading accepts what transformers' LlamaConfig accepts for the architecture we implement and
// refuses, naming the file, anything that would make our model compute something else: another
// model_type, rope_scaling (Llama 3.1+ "llama3" scaling, linear, dynamic, ...) or its transformers-5
// form rope_parameters with a rope_type other than "default", an activation other than silu,
// attention or MLP biases, a head_dim that is not hidden_size / num_attention_heads.
// Optional fields take transformers' defaults (num_key_value_heads = num_attention_heads,
// rope_theta 10000, rms_norm_eps 1e-6, max_position_embeddings 2048, tie_word_embeddings false,
// bos 1, eos 2). A null bos/eos id reads as -1; an eos list (Llama 3 instruct) reads as its first
// id. The DMC settings live under their own key, which transformers keeps as an extra attribute:
//   "dmc": {"enabled": true, "init_val": 5.0, "temperature": 0.1, "window": 12,
//           "omega_eps": 0.0078125}
// (every key optional, defaults as in DmcConfig; unknown keys are refused to catch typos).
// A LoMA model (model/loma.h) also carries its layout, every key required:
//   "loma": {"t": 2, "c": 4, "memory_token": 259, "repetition_token": 260}
// (absent for other models; the token ids must be the last two of the vocabulary).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace dmc::model {

// Parses and validates (LlamaConfig::Validate) a config.json. Every error names the file.
absl::StatusOr<LlamaConfig> ReadHfConfig(const std::string& config_json_path);

// Writes an HF-loadable config.json atomically (path.tmp, fsync, rename): architectures
// ["LlamaForCausalLM"], model_type "llama", hidden_act "silu", torch_dtype naming the weight dtype,
// rope_scaling null, no biases, plus the "dmc" object and, for a LoMA model, the "loma" object.
// Floats are written as the shortest decimal that reads back to the same float, so 1e-5f appears
// as 1e-05 and the file round-trips exactly.
absl::Status WriteHfConfig(const std::string& path, const LlamaConfig& config,
                           DType weight_dtype = DType::kBF16);

}  // namespace dmc::model
