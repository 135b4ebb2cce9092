// The model shapes the CUDA training benchmarks time (bench_train_step, bench_scaling), and their
// arbitrary inputs (timing does not depend on the values):
//   1b     a 1.36B Llama (24 layers, d 2048, 16 heads of 128, ffn 5632, vocab 32000, T 2048);
//   1b-2l  two of its layers (for per-kernel profiles);
//   7b-8l  eight layers of Llama 2 7B's width (d 4096, 32 heads of 128, ffn 11008, vocab 32000,
//          T 2048): tensor parallelism at the width it is meant for, on one GPU's memory;
//   7b-8l-4k  the same at Llama 2's context, T 4096;
//   1b-gqa a 0.97B GQA Llama (22 layers, d 2048, 32 heads / 4 KV heads of 64, ffn 5632, vocab
//          32000, T 2048), the decoding benchmarks' 1B shape;
//   medium the `medium` preset with the GPU pipeline's 8k vocabulary (17M parameters, T 512).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace dmc::bench {

struct Shape {
  std::string name;
  dmc::model::LlamaConfig config;
  int T = 0;
};

inline Shape MakeShape(const std::string& name) {
  Shape s;
  s.name = name;
  dmc::model::LlamaConfig& c = s.config;
  if (name == "1b" || name == "1b-2l") {
    c.vocab_size = 32000;
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    // 1b-2l: two of its layers, for per-kernel profiles (a tenth of the kernels, same shapes).
    c.num_hidden_layers = name == "1b" ? 24 : 2;
    c.num_attention_heads = 16;
    c.num_key_value_heads = 16;
    c.max_position_embeddings = 4096;
    s.T = 2048;
  } else if (name == "7b-8l" || name == "7b-8l-4k") {
    c.vocab_size = 32000;
    c.hidden_size = 4096;
    c.intermediate_size = 11008;
    c.num_hidden_layers = 8;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 32;
    c.max_position_embeddings = 4096;
    s.T = name == "7b-8l" ? 2048 : 4096;
  } else if (name == "1b-gqa") {
    c.vocab_size = 32000;
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    c.num_hidden_layers = 22;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 4;
    c.max_position_embeddings = 4096;
    s.T = 2048;
  } else if (name == "medium") {
    if (!dmc::model::PresetConfig("medium", &c).ok()) std::abort();
    c.vocab_size = 8192;  // the GPU pipeline's SentencePiece vocabulary
    s.T = 512;
  } else {
    std::fprintf(stderr, "unknown benchmark shape %s (1b, 1b-2l, 7b-8l, 7b-8l-4k, 1b-gqa, medium)\n", name.c_str());
    std::exit(2);
  }
  return s;
}

// n small uniform weights from an LCG (the host model's InitRandom draws normals, too slow at 1.4B
// for a benchmark set-up).
inline std::vector<float> ArbitraryWeights(size_t n, uint32_t seed) {
  std::vector<float> w(n);
  for (float& x : w) {
    seed = seed * 1664525u + 1013904223u;
    x = ((seed >> 9) * (1.0f / 8388608.0f) - 0.5f) * 0.04f;
  }
  return w;
}

// B × T input and target tokens from an LCG.
inline void ArbitraryTokens(int B, int T, int vocab, uint32_t seed, std::vector<int32_t>* in,
                            std::vector<int32_t>* tgt) {
  in->resize(static_cast<size_t>(B) * T);
  tgt->resize(in->size());
  for (size_t i = 0; i < in->size(); ++i) {
    seed = seed * 1664525u + 1013904223u;
    (*in)[i] = static_cast<int32_t>((seed >> 8) % vocab);
    (*tgt)[i] = static_cast<int32_t>((seed >> 4) % vocab);
  }
}

}  // namespace dmc::bench
