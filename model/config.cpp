#include "model/config.h"

#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

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
  if (dms.is_dms()) {
    if (dms.window < 0) return bad(absl::StrFormat("dms window must be >= 0, got %d", dms.window));
    if (!(dms.temperature > 0))
      return bad(absl::StrFormat("dms temperature must be > 0, got %g", dms.temperature));
    if (!(dms.scale > 0)) return bad(absl::StrFormat("dms scale must be > 0, got %g", dms.scale));
    if (dmc.enabled) return bad("dms and dmc.enabled do not combine (one compression per model)");
    if (loma.enabled()) return bad("dms and loma do not combine");
  } else if (dms.enabled) {
    return bad("dms.enabled needs a dms variant (adapter or query_channel)");
  }
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
  // the DMS adapter: RMSNorm(C) and Linear(C -> Hkv)
  const long adapter = dms.variant == DmsVariant::kAdapter ? C + C * num_key_value_heads : 0;
  const long per_layer = attn + mlp + 2 * C + adapter;
  const long embed = static_cast<long>(vocab_size) * C;
  return num_hidden_layers * per_layer + C + embed * (tie_word_embeddings ? 1 : 2);
}

const char* DmsVariantName(DmsVariant variant) {
  switch (variant) {
    case DmsVariant::kNone: return "none";
    case DmsVariant::kAdapter: return "adapter";
    case DmsVariant::kQueryChannel: return "query_channel";
  }
  return "?";
}

absl::Status PresetConfig(const std::string& name, LlamaConfig* c) {
  struct Preset {
    const char* name;
    int hidden, ffn, layers, heads, kv_heads, max_positions;
  };
  static const Preset presets[] = {
      {"tiny", 32, 64, 2, 4, 2, 256},     // CI: seconds on a CPU
      {"small", 128, 352, 4, 4, 4, 1024},  // the README's CPU job, 0.9M parameters
      // the smallest shape the fused CUDA attention takes (head dim 64): 3.4M parameters
      {"small-d64", 256, 704, 4, 4, 2, 1024},
      // the GPU pipeline's base model (head dim 64): 17M parameters with an 8k vocabulary
      {"medium", 384, 1024, 6, 6, 6, 2048},
  };
  std::vector<std::string> known;
  for (const Preset& p : presets) {
    known.push_back(p.name);
    if (name != p.name) continue;
    *c = LlamaConfig{};
    // Byte-level vocabulary: 256 bytes + BOS + EOS + PAD (data/tokenizer.h).
    c->vocab_size = 259;
    c->bos_token_id = 256;
    c->eos_token_id = 257;
    c->hidden_size = p.hidden;
    c->intermediate_size = p.ffn;
    c->num_hidden_layers = p.layers;
    c->num_attention_heads = p.heads;
    c->num_key_value_heads = p.kv_heads;
    c->max_position_embeddings = p.max_positions;
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrFormat("unknown model preset '%s' (known: %s)", name,
                                                    absl::StrJoin(known, ", ")));
}

}  // namespace dmc::model
