// The tiny DMC model, schedule and batches that the data- and tensor-parallel training tests
// (test_parallel_training.cpp, test_zero1.cpp) train under mpirun.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "model/llama.h"
#include "trainer/trainer.h"

namespace dmc::testing {

// Vocabulary 37: the vocabulary-parallel rows split unevenly over TP 2 and 4.
inline model::LlamaConfig TrainingTestModel() {
  model::LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.max_position_embeddings = 32;
  c.dmc.enabled = true;
  c.dmc.window = 4;
  // Mixed decisions from the first step, so the mask, the scan and the CR loss all matter.
  c.dmc.init_val = 0.5f;
  c.dmc.temperature = 1.0f;
  return c;
}

// Stages 2 and 3, two steps each (the optimizer is reset between them).
inline trainer::TrainConfig TrainingTestSchedule(int micro_batch) {
  trainer::TrainConfig tc;
  tc.seq_len = 10;
  tc.micro_batch = micro_batch;
  tc.schedule.stage2_steps = 2;
  tc.schedule.stage3_steps = 2;
  tc.schedule.retrofit_lr = 1e-2f;
  tc.schedule.retrofit_min_lr = 1e-3f;
  tc.schedule.cr_target = 3.0f;
  return tc;
}

// Global batch g of the run: `sequences` rows; a rank takes rows [first, first + count).
inline trainer::BatchSource GlobalBatchSlice(int first, int count, int seq_len, int vocab,
                                             int* calls) {
  return [=](std::vector<int32_t>* in, std::vector<int32_t>* tgt) {
    in->clear();
    tgt->clear();
    for (int b = first; b < first + count; ++b) {
      std::mt19937_64 rng(7919 * (*calls) + b);
      for (int t = 0; t < seq_len; ++t) {
        in->push_back(static_cast<int32_t>(rng() % vocab));
        tgt->push_back(static_cast<int32_t>(rng() % vocab));
      }
    }
    ++*calls;
    return absl::OkStatus();
  };
}

}  // namespace dmc::testing
