#include "model/hf_config.h"

#include <climits>
#include <cstdio>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace dmc::model {
namespace {

using json = nlohmann::json;

// Field readers over one parsed config.json; each error names the file and the field.
class Fields {
 public:
  Fields(const std::string& path, const json& j) : path_(path), j_(j) {}

  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", what));
  }

  // A field is absent when it is missing or null (transformers treats both as "use the default").
  bool Has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  absl::Status Int(const std::string& key, int* out, bool required) const {
    if (!Has(key)) return required ? Error(absl::StrCat("missing required field '", key, "'")) : absl::OkStatus();
    return ToInt(key, j_.at(key), out);
  }

  absl::Status Float(const std::string& key, float* out) const {
    if (!Has(key)) return absl::OkStatus();
    const json& v = j_.at(key);
    if (!v.is_number()) return Error(absl::StrCat("field '", key, "' must be a number, got ", v.dump()));
    *out = static_cast<float>(v.get<double>());
    return absl::OkStatus();
  }

  absl::Status Bool(const std::string& key, bool* out) const {
    if (!Has(key)) return absl::OkStatus();
    const json& v = j_.at(key);
    if (!v.is_boolean()) return Error(absl::StrCat("field '", key, "' must be true or false, got ", v.dump()));
    *out = v.get<bool>();
    return absl::OkStatus();
  }

  // bos/eos ids: an integer, null (no such token: -1), or a list whose first id we keep.
  absl::Status TokenId(const std::string& key, int* out) const {
    if (!j_.contains(key)) return absl::OkStatus();
    const json& v = j_.at(key);
    if (v.is_null() || (v.is_array() && v.empty())) {
      *out = -1;
      return absl::OkStatus();
    }
    return ToInt(key, v.is_array() ? v.at(0) : v, out);
  }

  absl::Status ToInt(const std::string& key, const json& v, int* out) const {
    if (!v.is_number_integer())
      return Error(absl::StrCat("field '", key, "' must be an integer, got ", v.dump()));
    const int64_t x = v.get<int64_t>();
    if (x < INT_MIN || x > INT_MAX) return Error(absl::StrCat("field '", key, "' is out of range: ", x));
    *out = static_cast<int>(x);
    return absl::OkStatus();
  }

 private:
  const std::string& path_;
  const json& j_;
};

#define DMC_RETURN_IF_ERROR(expr)                \
  do {                                           \
    if (auto _s = (expr); !_s.ok()) return _s;   \
  } while (0)

absl::Status ParseDmc(const std::string& path, const json& d, DmcConfig* dmc) {
  if (!d.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": field 'dmc' must be an object, got ", d.dump()));
  for (const auto& [key, value] : d.items()) {
    if (key != "enabled" && key != "init_val" && key != "temperature" && key != "window" &&
        key != "omega_eps")
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": unknown key 'dmc.", key,
          "' (known: enabled, init_val, temperature, window, omega_eps)"));
  }
  const std::string where = absl::StrCat(path, " (dmc)");
  const Fields f(where, d);
  DMC_RETURN_IF_ERROR(f.Bool("enabled", &dmc->enabled));
  DMC_RETURN_IF_ERROR(f.Float("init_val", &dmc->init_val));
  DMC_RETURN_IF_ERROR(f.Float("temperature", &dmc->temperature));
  DMC_RETURN_IF_ERROR(f.Int("window", &dmc->window, /*required=*/false));
  DMC_RETURN_IF_ERROR(f.Float("omega_eps", &dmc->omega_eps));
  return absl::OkStatus();
}

// The DMS settings (model/DMS.md); a model without the key is not a DMS model.
absl::Status ParseDms(const std::string& path, const json& d, DmsConfig* dms) {
  if (!d.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": field 'dms' must be an object, got ", d.dump()));
  for (const auto& [key, value] : d.items())
    if (key != "variant" && key != "enabled" && key != "window" && key != "scale" &&
        key != "offset" && key != "temperature")
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": unknown key 'dms.", key,
          "' (known: variant, enabled, window, scale, offset, temperature)"));
  if (!d.contains("variant") || !d["variant"].is_string())
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field 'dms.variant' must be \"adapter\" or \"query_channel\""));
  const std::string variant = d["variant"].get<std::string>();
  if (variant == DmsVariantName(DmsVariant::kAdapter))
    dms->variant = DmsVariant::kAdapter;
  else if (variant == DmsVariantName(DmsVariant::kQueryChannel))
    dms->variant = DmsVariant::kQueryChannel;
  else
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": dms.variant '", variant, "' is not \"adapter\" or \"query_channel\""));
  const std::string where = absl::StrCat(path, " (dms)");
  const Fields f(where, d);
  DMC_RETURN_IF_ERROR(f.Bool("enabled", &dms->enabled));
  DMC_RETURN_IF_ERROR(f.Int("window", &dms->window, /*required=*/true));
  DMC_RETURN_IF_ERROR(f.Float("scale", &dms->scale));
  DMC_RETURN_IF_ERROR(f.Float("offset", &dms->offset));
  DMC_RETURN_IF_ERROR(f.Float("temperature", &dms->temperature));
  return absl::OkStatus();
}

// The LoMA layout; every key required (a model either is a LoMA model or has no "loma" key).
absl::Status ParseLoma(const std::string& path, const json& d, LomaConfig* loma) {
  if (!d.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": field 'loma' must be an object, got ", d.dump()));
  for (const auto& [key, value] : d.items()) {
    if (key != "t" && key != "c" && key != "memory_token" && key != "repetition_token")
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": unknown key 'loma.", key, "' (known: t, c, memory_token, repetition_token)"));
  }
  const std::string where = absl::StrCat(path, " (loma)");
  const Fields f(where, d);
  DMC_RETURN_IF_ERROR(f.Int("t", &loma->zones.t, /*required=*/true));
  DMC_RETURN_IF_ERROR(f.Int("c", &loma->zones.c, /*required=*/true));
  DMC_RETURN_IF_ERROR(f.Int("memory_token", &loma->memory_token, /*required=*/true));
  DMC_RETURN_IF_ERROR(f.Int("repetition_token", &loma->repetition_token, /*required=*/true));
  if (loma->zones.t < 1)
    return f.Error(absl::StrCat("field 't' must be >= 1, got ", loma->zones.t,
                                " (a model without LoMA has no 'loma' key)"));
  return absl::OkStatus();
}

// transformers 5 writes rope_parameters {"rope_type": "default", "rope_theta": 500000.0} instead of
// rope_theta and rope_scaling; any other rope_type (llama3, linear, yarn, ...) or extra key means a
// scaled RoPE we do not implement.
absl::Status ParseRopeParameters(const std::string& path, const json& r, LlamaConfig* c) {
  const Fields f(path, r);
  auto unsupported = [&] {
    return f.Error(absl::StrCat("rope_parameters ", r.dump(),
                                " is not supported; only plain RoPE (rope_type \"default\") is"));
  };
  if (!r.is_object()) return unsupported();
  for (const auto& [key, value] : r.items()) {
    if (key == "rope_type" || key == "type") {
      if (value != "default") return unsupported();
    } else if (key != "rope_theta") {
      return unsupported();
    }
  }
  return f.Float("rope_theta", &c->rope_theta);
}

absl::Status Parse(const std::string& path, const json& j, LlamaConfig* c) {
  const Fields f(path, j);
  if (!j.is_object()) return f.Error("expected a JSON object");

  // Architecture checks first: a Mistral or a rope-scaled Llama 3.1 config should say so, not
  // fail later on some field.
  if (!f.Has("model_type")) return f.Error("missing model_type (expected \"llama\")");
  if (j["model_type"] != "llama")
    return f.Error(absl::StrCat("model_type is ", j["model_type"].dump(),
                                "; only \"llama\" (LlamaForCausalLM) is supported"));
  if (f.Has("rope_scaling"))
    return f.Error(absl::StrCat("rope_scaling ", j["rope_scaling"].dump(),
                                " is not supported; only plain RoPE (rope_scaling null) is"));
  if (f.Has("hidden_act") && j["hidden_act"] != "silu")
    return f.Error(absl::StrCat("hidden_act is ", j["hidden_act"].dump(), "; only \"silu\" is supported"));
  for (const char* bias : {"attention_bias", "mlp_bias"}) {
    bool has_bias = false;
    DMC_RETURN_IF_ERROR(f.Bool(bias, &has_bias));
    if (has_bias) return f.Error(absl::StrCat(bias, " is true; biases are not supported"));
  }

  *c = LlamaConfig{};
  // transformers' LlamaConfig defaults for the optional fields.
  c->max_position_embeddings = 2048;
  c->rms_norm_eps = 1e-6f;
  c->rope_theta = 10000.0f;
  c->tie_word_embeddings = false;
  c->bos_token_id = 1;
  c->eos_token_id = 2;

  DMC_RETURN_IF_ERROR(f.Int("vocab_size", &c->vocab_size, true));
  DMC_RETURN_IF_ERROR(f.Int("hidden_size", &c->hidden_size, true));
  DMC_RETURN_IF_ERROR(f.Int("intermediate_size", &c->intermediate_size, true));
  DMC_RETURN_IF_ERROR(f.Int("num_hidden_layers", &c->num_hidden_layers, true));
  DMC_RETURN_IF_ERROR(f.Int("num_attention_heads", &c->num_attention_heads, true));
  c->num_key_value_heads = c->num_attention_heads;
  DMC_RETURN_IF_ERROR(f.Int("num_key_value_heads", &c->num_key_value_heads, false));
  DMC_RETURN_IF_ERROR(f.Int("max_position_embeddings", &c->max_position_embeddings, false));
  DMC_RETURN_IF_ERROR(f.Float("rms_norm_eps", &c->rms_norm_eps));
  DMC_RETURN_IF_ERROR(f.Float("rope_theta", &c->rope_theta));
  if (f.Has("rope_parameters")) DMC_RETURN_IF_ERROR(ParseRopeParameters(path, j["rope_parameters"], c));
  DMC_RETURN_IF_ERROR(f.Bool("tie_word_embeddings", &c->tie_word_embeddings));
  DMC_RETURN_IF_ERROR(f.TokenId("bos_token_id", &c->bos_token_id));
  DMC_RETURN_IF_ERROR(f.TokenId("eos_token_id", &c->eos_token_id));

  // Newer transformers allow head_dim != hidden_size / num_attention_heads; our layers derive it.
  if (f.Has("head_dim") && c->num_attention_heads > 0) {
    int head_dim = 0;
    DMC_RETURN_IF_ERROR(f.Int("head_dim", &head_dim, false));
    if (head_dim != c->head_dim())
      return f.Error(absl::StrCat("head_dim ", head_dim, " differs from hidden_size / num_attention_heads = ",
                                  c->head_dim(), "; only the derived head_dim is supported"));
  }
  if (f.Has("dmc")) DMC_RETURN_IF_ERROR(ParseDmc(path, j["dmc"], &c->dmc));
  if (f.Has("dms")) DMC_RETURN_IF_ERROR(ParseDms(path, j["dms"], &c->dms));
  if (f.Has("loma")) DMC_RETURN_IF_ERROR(ParseLoma(path, j["loma"], &c->loma));

  if (auto s = c->Validate(); !s.ok()) return f.Error(std::string(s.message()));
  return absl::OkStatus();
}

// The shortest decimal that reads back as the same float, as a double: 1e-5f is stored as
// 9.99999974738e-06 and would otherwise be written that way, and transformers would then use a
// slightly different epsilon than the file we imported.
double ShortestDecimal(float x) {
  char buf[32];
  for (int digits = 1; digits <= 9; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(x));
    if (std::strtof(buf, nullptr) == x) break;
  }
  return std::strtod(buf, nullptr);
}

const char* TorchDtype(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    default: return nullptr;
  }
}

json TokenIdJson(int id) { return id < 0 ? json(nullptr) : json(id); }

}  // namespace

absl::StatusOr<LlamaConfig> ReadHfConfig(const std::string& config_json_path) {
  auto text = ReadFileToString(config_json_path);
  if (!text.ok()) return text.status();
  json j;
  try {
    j = json::parse(*text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(config_json_path, ": invalid JSON: ", e.what()));
  }
  LlamaConfig config;
  if (auto s = Parse(config_json_path, j, &config); !s.ok()) return s;
  return config;
}

absl::Status WriteHfConfig(const std::string& path, const LlamaConfig& c, DType weight_dtype) {
  if (auto s = c.Validate(); !s.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.message()));
  const char* torch_dtype = TorchDtype(weight_dtype);
  if (torch_dtype == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(path, ": weight dtype ", DTypeName(weight_dtype),
                                                   " is not F32, F16 or BF16"));
  json j = json::object();
  j["architectures"] = json::array({"LlamaForCausalLM"});
  j["model_type"] = "llama";
  j["hidden_act"] = "silu";
  j["torch_dtype"] = torch_dtype;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = ShortestDecimal(c.rms_norm_eps);
  j["rope_theta"] = ShortestDecimal(c.rope_theta);
  j["rope_scaling"] = nullptr;
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = TokenIdJson(c.bos_token_id);
  j["eos_token_id"] = TokenIdJson(c.eos_token_id);
  j["dmc"] = {{"enabled", c.dmc.enabled},
              {"init_val", ShortestDecimal(c.dmc.init_val)},
              {"temperature", ShortestDecimal(c.dmc.temperature)},
              {"window", c.dmc.window},
              {"omega_eps", ShortestDecimal(c.dmc.omega_eps)}};
  if (c.dms.is_dms())
    j["dms"] = {{"variant", DmsVariantName(c.dms.variant)},
                {"enabled", c.dms.enabled},
                {"window", c.dms.window},
                {"scale", ShortestDecimal(c.dms.scale)},
                {"offset", ShortestDecimal(c.dms.offset)},
                {"temperature", ShortestDecimal(c.dms.temperature)}};
  if (c.loma.enabled())
    j["loma"] = {{"t", c.loma.zones.t},
                 {"c", c.loma.zones.c},
                 {"memory_token", c.loma.memory_token},
                 {"repetition_token", c.loma.repetition_token}};
  // transformers writes config.json with indent 2 and sorted keys; nlohmann sorts keys too.
  return WriteFileAtomically(path, j.dump(2) + "\n");
}

#undef DMC_RETURN_IF_ERROR

}  // namespace dmc::model
