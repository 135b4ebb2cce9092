#include "model/config.h"

#include "absl/strings/str_format.h"

namespace dmc::model {

absl::Status LlamaConfig::Validate() const {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError("invalid model config: " + what);
  };
  if (vocab_size <= 0) return bad(absl::StrFormat("vocab_size must be > 0, got %d", vocab_size));
  if (hidden_size <= 0) return bad(absl::StrFormat("hidden_size must be > 0, got %d", hidden_size));
  if (intermediate_size <= 0)
    return bad(absl::StrFormat("intermediate_size must be > 0, got %d", intermediate_size));
  if (num_hidden_layers <= 0)
    return bad(absl::StrFormat("num_hidden_layers must be > 0, got %d", num_hidden_layers));
  if (num_attention_heads <= 0)
    return bad(absl::StrFormat("num_attention_heads must be > 0, got %d", num_attention_heads));
  if (num_key_value_heads <= 0)
    return bad(absl::StrFormat("num_key_value_heads must be > 0, got %d", num_key_value_heads));
  if (hidden_size % num_attention_heads != 0)
    return bad(absl::StrFormat("num_attention_heads (%d) must divide hidden_size (%d)",
                               num_attention_heads, hidden_size));
  if (num_attention_heads % num_key_value_heads != 0)
    return bad(absl::StrFormat("num_key_value_heads (%d) must divide num_attention_heads (%d)",
                               num_key_value_heads, num_attention_heads));
  if (head_dim() % 2 != 0)
    return bad(absl::StrFormat("head_dim (%d) must be even for rotary embeddings", head_dim()));
  if (head_dim() < 4)
    return bad(absl::StrFormat("head_dim (%d) must be at least 4", head_dim()));
  if (max_position_embeddings <= 0)
    return bad(absl::StrFormat("max_position_embeddings must be > 0, got %d",
                               max_position_embeddings));
  if (!(rms_norm_eps > 0)) return bad(absl::StrFormat("rms_norm_eps must be > 0, got %g", rms_norm_eps));
  if (!(rope_theta > 0)) return bad(absl::StrFormat("rope_theta must be > 0, got %g", rope_theta));
  if (!(dmc.temperature > 0))
    return bad(absl::StrFormat("dmc temperature must be > 0, got %g", dmc.temperature));
  if (dmc.window <= 0) return bad(absl::StrFormat("dmc window must be > 0, got %d", dmc.window));
  if (!(dmc.omega_eps >= 0))
    return bad(absl::StrFormat("dmc omega_eps must be >= 0, got %g", dmc.omega_eps));
  if (loma.zones.t < 0) return bad(absl::StrFormat("loma t must be >= 0, got %d", loma.zones.t));
  if (loma.enabled()) {
    if (loma.zones.c < 1) return bad(absl::StrFormat("loma c must be >= 1, got %d", loma.zones.c));
    if (vocab_size < 3 || loma.memory_token != vocab_size - 2 || loma.repetition_token != vocab_size - 1)
      return bad(absl::StrFormat(
          "loma memory_token %d and repetition_token %d must be the last two ids of the "
          "vocabulary (%d and %d)",
          loma.memory_token, loma.repetition_token, vocab_size - 2, vocab_size - 1));
    if (dmc.enabled) return bad("loma and dmc.enabled do not combine");
  }
  return absl::OkStatus();
}

long LlamaConfig::num_parameters() const {
  const long C = hidden_size, F = intermediate_size, D = head_dim();
  const long attn = C * (num_attention_heads * D) * 2 + C * (num_key_value_heads * D) * 2;
  const long mlp = 3 * C * F;
  const long per_layer = attn + mlp + 2 * C;
  const long embed = static_cast<long>(vocab_size) * C;
  return num_hidden_layers * per_layer + C + embed * (tie_word_embeddings ? 1 : 2);
}

absl::Status PresetConfig(const std::string& name, LlamaConfig* c) {
  // Byte-level vocabulary: 256 bytes + BOS + EOS + PAD (data/byte_tokenizer).
  if (name == "tiny") {
    *c = LlamaConfig{};
    c->vocab_size = 259;
    c->hidden_size = 32;
    c->intermediate_size = 64;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->max_position_embeddings = 256;
  } else if (name == "small") {
    *c = LlamaConfig{};
    c->vocab_size = 259;
    c->hidden_size = 128;
    c->intermediate_size = 352;
    c->num_hidden_layers = 4;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 4;
    c->max_position_embeddings = 1024;
  } else if (name == "small-d64") {
    // The smallest shape the fused CUDA attention takes (head dim 64): 3.4M parameters.
    *c = LlamaConfig{};
    c->vocab_size = 259;
    c->hidden_size = 256;
    c->intermediate_size = 704;
    c->num_hidden_layers = 4;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->max_position_embeddings = 1024;
  } else if (name == "medium") {
    // 17M parameters with an 8k vocabulary: the GPU pipeline's base model (head dim 64).
    *c = LlamaConfig{};
    c->vocab_size = 259;
    c->hidden_size = 384;
    c->intermediate_size = 1024;
    c->num_hidden_layers = 6;
    c->num_attention_heads = 6;
    c->num_key_value_heads = 6;
    c->max_position_embeddings = 2048;
  } else {
    return absl::InvalidArgumentError(absl::StrFormat(
        "unknown model preset '%s' (known: tiny, small, small-d64, medium)", name));
  }
  c->bos_token_id = 256;
  c->eos_token_id = 257;
  return absl::OkStatus();
}

}  // namespace dmc::model
