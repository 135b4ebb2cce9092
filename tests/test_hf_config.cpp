// Hugging Face config.json: real Llama configs read as transformers reads them, our writer's
// output reads back exactly (DMC and LoMA keys included), and every refusal names the file.
#include "model/hf_config.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"

namespace dmc::model {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// transformers' own config.json of Llama-2-7b-hf (trimmed of fields we do not use).
constexpr const char* kLlama2_7B = R"({
  "architectures": ["LlamaForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 11008,
  "max_position_embeddings": 4096,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 32,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "tie_word_embeddings": false,
  "torch_dtype": "float16",
  "transformers_version": "4.31.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

// What transformers 5.17 save_pretrained wrote for a small LlamaConfig (on the device): "dtype"
// instead of torch_dtype and rope_parameters instead of rope_theta/rope_scaling.
constexpr const char* kTransformers5Small = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "dtype": "bfloat16",
  "eos_token_id": 2,
  "head_dim": 8,
  "hidden_act": "silu",
  "hidden_size": 32,
  "initializer_range": 0.02,
  "intermediate_size": 64,
  "max_position_embeddings": 128,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pad_token_id": null,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "rope_theta": 500000.0,
    "rope_type": "default"
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.17.0",
  "use_cache": true,
  "vocab_size": 64
})";

class HfConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "dmc_hf_config_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = (fs::path(dir_) / "config.json").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  void WriteText(const std::string& text) { std::ofstream(path_) << text; }
  void Write(const json& j) { WriteText(j.dump(2)); }

  // Expects ReadHfConfig(path_) to fail with a message naming the file and containing what.
  void ExpectError(const std::string& what) {
    auto config = ReadHfConfig(path_);
    ASSERT_FALSE(config.ok()) << "expected an error about: " << what;
    EXPECT_TRUE(absl::StrContains(config.status().message(), path_)) << config.status().message();
    EXPECT_TRUE(absl::StrContains(config.status().message(), what)) << config.status().message();
  }

  std::string dir_, path_;
};

TEST_F(HfConfigTest, ReadsLlama2Config) {
  WriteText(kLlama2_7B);
  auto c = ReadHfConfig(path_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 32000);
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->intermediate_size, 11008);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_EQ(c->rms_norm_eps, 1e-5f);
  EXPECT_EQ(c->rope_theta, 10000.0f);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_id, 2);
  EXPECT_FALSE(c->dmc.enabled);
  EXPECT_EQ(c->num_parameters(), 6738415616L);  // Llama-2-7B's well-known count
}

// Llama 3 style: GQA, rope_theta 500000, an eos list; optional fields missing take transformers'
// defaults.
TEST_F(HfConfigTest, ReadsGqaConfigAndAppliesTransformersDefaults) {
  json j = json::parse(kLlama2_7B);
  j["num_key_value_heads"] = 8;
  j["rope_theta"] = 500000.0;
  j["eos_token_id"] = {128001, 128008, 128009};
  j["bos_token_id"] = nullptr;
  j.erase("rms_norm_eps");
  j.erase("max_position_embeddings");
  j.erase("tie_word_embeddings");
  j.erase("hidden_act");
  Write(j);
  auto c = ReadHfConfig(path_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->eos_token_id, 128001);
  EXPECT_EQ(c->bos_token_id, -1);
  EXPECT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FALSE(c->tie_word_embeddings);

  j.erase("num_key_value_heads");  // absent: as many KV heads as query heads
  Write(j);
  c = ReadHfConfig(path_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 32);
}

TEST_F(HfConfigTest, ReadsTransformers5RopeParameters) {
  WriteText(kTransformers5Small);
  auto c = ReadHfConfig(path_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->head_dim(), 8);
  EXPECT_EQ(c->max_position_embeddings, 128);

  json j = json::parse(kTransformers5Small);
  j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 8.0}};
  Write(j);
  ExpectError("rope_parameters {\"factor\":8.0,\"rope_theta\":500000.0,\"rope_type\":\"llama3\"} is not supported");
}

// Everything our writer stores reads back identically, the DMC settings included, and the file
// has the keys transformers needs to pick LlamaForCausalLM.
TEST_F(HfConfigTest, WriteReadRoundTripIncludingDmc) {
  LlamaConfig c;
  ASSERT_TRUE(PresetConfig("tiny", &c).ok());
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 500000.0f;
  c.tie_word_embeddings = true;
  c.dmc.enabled = true;
  c.dmc.init_val = 4.5f;
  c.dmc.temperature = 0.1f;
  c.dmc.window = 8;
  c.dmc.omega_eps = 0.0078125f;
  ASSERT_TRUE(WriteHfConfig(path_, c, DType::kBF16).ok());
  EXPECT_FALSE(fs::exists(path_ + ".tmp"));

  auto r = ReadHfConfig(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->vocab_size, c.vocab_size);
  EXPECT_EQ(r->hidden_size, c.hidden_size);
  EXPECT_EQ(r->intermediate_size, c.intermediate_size);
  EXPECT_EQ(r->num_hidden_layers, c.num_hidden_layers);
  EXPECT_EQ(r->num_attention_heads, c.num_attention_heads);
  EXPECT_EQ(r->num_key_value_heads, c.num_key_value_heads);
  EXPECT_EQ(r->max_position_embeddings, c.max_position_embeddings);
  EXPECT_EQ(r->rms_norm_eps, c.rms_norm_eps);
  EXPECT_EQ(r->rope_theta, c.rope_theta);
  EXPECT_EQ(r->tie_word_embeddings, c.tie_word_embeddings);
  EXPECT_EQ(r->bos_token_id, c.bos_token_id);
  EXPECT_EQ(r->eos_token_id, c.eos_token_id);
  EXPECT_EQ(r->dmc.enabled, true);
  EXPECT_EQ(r->dmc.init_val, 4.5f);
  EXPECT_EQ(r->dmc.temperature, 0.1f);
  EXPECT_EQ(r->dmc.window, 8);
  EXPECT_EQ(r->dmc.omega_eps, 0.0078125f);

  std::ifstream in(path_);
  const json j = json::parse(in);
  EXPECT_EQ(j["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(j["model_type"], "llama");
  EXPECT_EQ(j["hidden_act"], "silu");
  EXPECT_EQ(j["torch_dtype"], "bfloat16");
  EXPECT_TRUE(j["rope_scaling"].is_null());
  EXPECT_EQ(j["rms_norm_eps"].get<double>(), 1e-5);  // written as 1e-05, not 9.99999974738e-06
  EXPECT_EQ(j["dmc"]["temperature"].get<double>(), 0.1);
  EXPECT_EQ(j["dmc"]["window"], 8);

  // A DMC-off model and an fp32 export.
  c.dmc = DmcConfig{};
  ASSERT_TRUE(WriteHfConfig(path_, c, DType::kF32).ok());
  r = ReadHfConfig(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->dmc.enabled);
  EXPECT_EQ(r->dmc.window, DmcConfig{}.window);
  std::ifstream in2(path_);
  EXPECT_EQ(json::parse(in2)["torch_dtype"], "float32");
}

TEST_F(HfConfigTest, NullTokenIdsRoundTrip) {
  LlamaConfig c;
  ASSERT_TRUE(PresetConfig("tiny", &c).ok());
  c.bos_token_id = -1;
  ASSERT_TRUE(WriteHfConfig(path_, c).ok());
  auto r = ReadHfConfig(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->bos_token_id, -1);
  EXPECT_EQ(r->eos_token_id, c.eos_token_id);
}

TEST_F(HfConfigTest, MissingFileIsNotFound) {
  auto c = ReadHfConfig(path_);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(c.status().message(), path_));
}

TEST_F(HfConfigTest, BadJsonNamesFile) {
  WriteText(R"({"model_type": "llama", "hidden_size": 4096,)");
  ExpectError("invalid JSON");
}

TEST_F(HfConfigTest, MissingRequiredFieldNamesFileAndField) {
  json j = json::parse(kLlama2_7B);
  j.erase("intermediate_size");
  Write(j);
  ExpectError("missing required field 'intermediate_size'");
}

TEST_F(HfConfigTest, WrongFieldTypeIsRefused) {
  json j = json::parse(kLlama2_7B);
  j["hidden_size"] = "4096";
  Write(j);
  ExpectError("field 'hidden_size' must be an integer, got \"4096\"");
  j = json::parse(kLlama2_7B);
  j["num_hidden_layers"] = 32.5;
  Write(j);
  ExpectError("field 'num_hidden_layers' must be an integer");
}

TEST_F(HfConfigTest, NonLlamaModelTypeIsRefused) {
  json j = json::parse(kLlama2_7B);
  j["model_type"] = "mistral";
  Write(j);
  ExpectError("model_type is \"mistral\"; only \"llama\"");
  j.erase("model_type");
  Write(j);
  ExpectError("missing model_type");
}

TEST_F(HfConfigTest, RopeScalingIsRefused) {
  json j = json::parse(kLlama2_7B);
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  Write(j);
  ExpectError("rope_scaling {\"factor\":8.0,\"rope_type\":\"llama3\"} is not supported");
}

TEST_F(HfConfigTest, UnsupportedArchitectureVariantsAreRefused) {
  json j = json::parse(kLlama2_7B);
  j["hidden_act"] = "gelu";
  Write(j);
  ExpectError("hidden_act is \"gelu\"; only \"silu\"");
  j = json::parse(kLlama2_7B);
  j["attention_bias"] = true;
  Write(j);
  ExpectError("attention_bias is true");
  j = json::parse(kLlama2_7B);
  j["head_dim"] = 256;
  Write(j);
  ExpectError("head_dim 256 differs from hidden_size / num_attention_heads = 128");
}

TEST_F(HfConfigTest, InconsistentShapesFailValidation) {
  json j = json::parse(kLlama2_7B);
  j["num_key_value_heads"] = 5;
  Write(j);
  ExpectError("num_key_value_heads (5) must divide num_attention_heads (32)");
}

TEST_F(HfConfigTest, BadDmcSettingsAreRefused) {
  json j = json::parse(kLlama2_7B);
  j["dmc"] = {{"enabled", true}, {"windw", 12}};
  Write(j);
  ExpectError("unknown key 'dmc.windw'");
  j["dmc"] = {{"enabled", "yes"}};
  Write(j);
  ExpectError("field 'enabled' must be true or false");
  j["dmc"] = {{"temperature", 0.0}};
  Write(j);
  ExpectError("dmc temperature must be > 0");
  j["dmc"] = 3;
  Write(j);
  ExpectError("field 'dmc' must be an object");
}

// A LoMA model's layout reads back; a model without LoMA writes no "loma" key.
TEST_F(HfConfigTest, WriteReadRoundTripOfLoma) {
  LlamaConfig c;
  ASSERT_TRUE(PresetConfig("tiny", &c).ok());
  c.vocab_size += 2;
  c.loma = {{2, 4}, c.vocab_size - 2, c.vocab_size - 1};
  ASSERT_TRUE(WriteHfConfig(path_, c).ok());
  auto r = ReadHfConfig(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->loma.enabled());
  EXPECT_EQ(r->loma.zones.t, 2);
  EXPECT_EQ(r->loma.zones.c, 4);
  EXPECT_EQ(r->loma.memory_token, c.vocab_size - 2);
  EXPECT_EQ(r->loma.repetition_token, c.vocab_size - 1);
  EXPECT_EQ(r->text_vocab_size(), c.vocab_size - 2);
  std::ifstream in(path_);
  EXPECT_EQ(json::parse(in)["loma"],
            json({{"t", 2}, {"c", 4}, {"memory_token", 259}, {"repetition_token", 260}}));

  c.loma = LomaConfig{};
  ASSERT_TRUE(WriteHfConfig(path_, c).ok());
  r = ReadHfConfig(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->loma.enabled());
  EXPECT_EQ(r->text_vocab_size(), c.vocab_size);
  std::ifstream in2(path_);
  EXPECT_FALSE(json::parse(in2).contains("loma"));
}

TEST_F(HfConfigTest, BadLomaSettingsAreRefused) {
  json j = json::parse(kLlama2_7B);  // vocab_size 32000
  const json good = {{"t", 2}, {"c", 4}, {"memory_token", 31998}, {"repetition_token", 31999}};
  j["loma"] = good;
  Write(j);
  ASSERT_TRUE(ReadHfConfig(path_).ok());
  j["loma"]["ratio"] = 4;
  Write(j);
  ExpectError("unknown key 'loma.ratio'");
  j["loma"] = good;
  j["loma"].erase("repetition_token");
  Write(j);
  ExpectError("missing required field 'repetition_token'");
  j["loma"] = good;
  j["loma"]["t"] = 0;
  Write(j);
  ExpectError("field 't' must be >= 1, got 0");
  j["loma"] = good;
  j["loma"]["c"] = 0;
  Write(j);
  ExpectError("loma c must be >= 1, got 0");
  j["loma"] = good;
  j["loma"]["memory_token"] = 5;
  Write(j);
  ExpectError("must be the last two ids of the vocabulary (31998 and 31999)");
  j["loma"] = good;
  j["dmc"] = {{"enabled", true}};
  Write(j);
  ExpectError("loma and dmc.enabled do not combine");
  j.erase("dmc");
  j["loma"] = "on";
  Write(j);
  ExpectError("field 'loma' must be an object");
}

TEST_F(HfConfigTest, WriteRefusesInvalidConfig) {
  LlamaConfig c;  // all zeros
  const absl::Status s = WriteHfConfig(path_, c);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.message(), path_)) << s.message();
  EXPECT_FALSE(fs::exists(path_));
}

}  // namespace
}  // namespace dmc::model
