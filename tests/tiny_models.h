// Tiny models shared by the model, inference and LoMA tests: small enough for finite differences
// and token-by-token comparisons in double precision, with weights large enough that attention,
// the DMC decisions and the importances all matter.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "model/llama.h"

namespace dmc::tiny_models {

// 2 layers, 4 heads of 4 over kv_heads KV heads, hidden 16, SwiGLU 12, 64 positions.
inline model::LlamaConfig TinyLlama(int vocab, int kv_heads, bool tied = false) {
  model::LlamaConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 16;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = kv_heads;
  c.max_position_embeddings = 64;
  c.rope_theta = 100.0f;
  c.tie_word_embeddings = tied;
  return c;
}

// Uniform(-scale, scale) matrices and 1 + Uniform(-scale, scale) norms, from `seed`.
template <typename T>
void RandomizeParams(model::Llama<T>& m, uint64_t seed, double scale = 0.4) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-scale, scale);
  for (const auto& s : m.param_specs())
    for (size_t i = 0; i < s.size; ++i)
      m.params()[s.offset + i] = static_cast<T>(s.shape.size() == 1 ? 1.0 + dist(rng) : dist(rng));
}

// n token ids uniform in [0, vocab), from `seed`.
inline std::vector<int32_t> RandomTokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

}  // namespace dmc::tiny_models
