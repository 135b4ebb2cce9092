// Model configuration: the Hugging Face LlamaConfig fields we use, plus the DMC and LoMA settings
// that retrofitting adds (exported under their own keys in config.json).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kernels/loma_mask.h"

namespace dmc::model {

struct DmcConfig {
  bool enabled = false;         // DMC head logic in the layer graph (stages 2 and 3)
  float init_val = 5.0f;        // decision offset c: a = k[D-1] - c, omega = sigmoid(q[D-1] + c)
  float temperature = 0.1f;     // Gumbel-sigmoid temperature tau
  int window = 12;              // partial-accumulation window w
  float omega_eps = 0.0078125f; // bf16 epsilon added to omega
};

// DMS (model/DMS.md): learned delayed eviction. A token t's decision d_t = 1[a_t > 0] marks token
// t-1 for eviction; a marked token stays visible while it is among the last window + 1 tokens, then
// leaves the cache. a_t = scale · x_t - offset, where x_t is
//   kAdapter       Linear(RMSNorm(r_t)) of the layer's residual input r_t, per KV head: new
//                  parameters (zero-initialised projection), the base frozen (released code)
//   kQueryChannel  channel D-1 of the group's first query head before RoPE, zeroed in that head
//                  for attention; no new parameters, all weights trained (the paper)
// variant kNone: not a DMS model. enabled switches eviction on in the layer graph (the trainer, at
// stage 2); with it off the model is the plain one, which is the adapter variant's teacher.
enum class DmsVariant { kNone, kAdapter, kQueryChannel };
const char* DmsVariantName(DmsVariant variant);  // "none", "adapter", "query_channel"

struct DmsConfig {
  DmsVariant variant = DmsVariant::kNone;
  bool enabled = false;
  int window = 512;            // w: a marked token is seen by itself and the next w queries
  float scale = 100.0f;        // s
  float offset = 5.0f;         // c
  float temperature = 0.1f;    // tau of the Gumbel-sigmoid
  bool is_dms() const { return variant != DmsVariant::kNone; }
};

// LoMA (model/loma.h): the layout a LoMA-retrofitted model was trained with and decodes with.
// zones.t = 0 (the default): not a LoMA model. When on, <m> and <r> are the last two ids of the
// vocabulary (vocab_size - 2 and vocab_size - 1), as model::AddLomaTokens appends them.
struct LomaConfig {
  kernels::LomaZones zones;
  int32_t memory_token = 0;      // <m>
  int32_t repetition_token = 0;  // <r>
  bool enabled() const { return zones.enabled(); }
};

struct LlamaConfig {
  int vocab_size = 0;
  int hidden_size = 0;              // C
  int intermediate_size = 0;        // F (SwiGLU hidden)
  int num_hidden_layers = 0;        // L
  int num_attention_heads = 0;      // H
  int num_key_value_heads = 0;      // Hkv (GQA when < H)
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  bool tie_word_embeddings = false;
  int bos_token_id = 1;
  int eos_token_id = 2;
  DmcConfig dmc;
  DmsConfig dms;
  LomaConfig loma;

  int head_dim() const { return hidden_size / num_attention_heads; }
  // DMC merging or DMS eviction on in the layer graph.
  bool compression_enabled() const { return dmc.enabled || dms.enabled; }
  // Ids of the text (what the data holds): the vocabulary less LoMA's two special tokens.
  int text_vocab_size() const { return loma.enabled() ? vocab_size - 2 : vocab_size; }
  // Rejects every inconsistent value with a message that names the field.
  absl::Status Validate() const;
  // Number of parameters of the full (unsharded) model.
  long num_parameters() const;
};

// Small built-in shapes: "tiny" (CI, seconds on a CPU), "small" (the README's CPU job),
// "small-d64" (head dim 64, the smallest shape the CUDA attention kernels take), "medium" (17M
// parameters at an 8k vocabulary, head dim 64). Their vocabulary is the byte tokenizer's; dmc-train
// replaces it with the one the training shards record.
absl::Status PresetConfig(const std::string& name, LlamaConfig* config);

}  // namespace dmc::model
