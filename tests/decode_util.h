// Token-by-token decoding on the CPU engine, and the cache shape of the byte-budget tests
// (dmc-eval --kv_fraction), shared by the tests of the KV cache compressors.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "inference/cache_policy.h"
#include "inference/cpu_engine.h"
#include "inference/scheduler.h"
#include "model/llama.h"

namespace dmc::tiny_models {

// Greedy decoding of B sequences token by token (prompt fed step by step) on the CPU engine;
// returns the logits of every position [B, T, V], and appends each sequence's slots per (layer,
// KV head) at its end to *lengths. A settling cache (quantized, ThinK) must have compressed
// something.
template <typename T>
std::vector<T> DecodeLogits(model::Llama<T>& m, const inference::CachePolicy& policy,
                            const std::vector<std::vector<int32_t>>& tokens, int page_size,
                            std::vector<int>* lengths = nullptr) {
  const int V = m.config().vocab_size;
  auto engine = inference::CpuEngine<T>::Create(m, policy, 1L << 24, page_size);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  std::vector<inference::Request> requests(tokens.size());
  for (size_t b = 0; b < tokens.size(); ++b) {
    requests[b].tokens = tokens[b];
    requests[b].length = static_cast<int>(tokens[b].size());
  }
  const size_t T_ = tokens[0].size();
  std::vector<T> logits(tokens.size() * T_ * V);
  const inference::CpuEngine<T>& e = **engine;
  auto stats = inference::RunBatched(
      **engine, requests, 2,
      [&](int r, int p, const inference::TokenOutput&) {
        std::copy_n(e.last_logits(r), V, logits.begin() + (r * T_ + p) * V);
        return true;
      },
      [&](int r, bool) {
        const auto& c = m.config();
        long compressed = 0;
        for (int l = 0; l < c.num_hidden_layers; ++l)
          for (int h = 0; h < c.num_key_value_heads; ++h) {
            compressed += e.cache().compressed_length(r, l, h);
            if (lengths) lengths->push_back(e.length(r, l, h));
          }
        EXPECT_TRUE(!inference::KvSettles(e.cache_options()) || compressed > 0)
            << "nothing was compressed";
      });
  EXPECT_TRUE(stats.ok()) << stats.status();
  return logits;
}

inline double MaxAbsDiff(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

// The cache shape of the byte-budget tests: 2 layers, 2 KV heads of 16, pages of 16.
inline inference::PagedCacheOptions BudgetShape() {
  inference::PagedCacheOptions shape;
  shape.layers = shape.kv_heads = 2;
  shape.head_dim = shape.page_size = 16;
  return shape;
}

}  // namespace dmc::tiny_models
