// What dmc-generate and dmc-serve both choose from their flags: the cache method a model runs,
// the tokenizer, and the engine (the CPU decoder, or the GPU one where CUDA is built).
// engine_setup.cpp is compiled into each tool (not the CPU library) because the GPU engine is
// only there with CUDA.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "data/tokenizer.h"
#include "inference/decode_engine.h"
#include "model/llama.h"

namespace dmc::inference {

// `name` empty: dms for a DMS model, dmc for a DMC model, loma for a LoMA model, else vanilla.
// Refuses dmc on a model without DMC, loma on one without LoMA, and methods outside `allowed` (a
// comma-separated list of names).
absl::StatusOr<CacheMethod> ChooseCacheMethod(const model::LlamaConfig& config,
                                              const std::string& name,
                                              const std::string& model_dir,
                                              const std::string& allowed);

// Slots a head holds at most over a sequence of `context` tokens, what a budget for one whole
// sequence must hold: context, and for loma t more (a compression's new memory slots join the
// full segment before it goes; t·k + tc + t <= (k + 1)·tc + t).
int MaxHeadSlots(const model::LlamaConfig& config, CacheMethod method, int context);

// spec: "byte", a tokenizer.model path, or empty: MODEL_DIR/tokenizer.model when there is one,
// else byte. Checks that its vocabulary is the model's.
absl::StatusOr<std::unique_ptr<data::Tokenizer>> ChooseTokenizer(const std::string& spec,
                                                                 const std::string& model_dir,
                                                                 int vocab_size);

struct EngineSpec {
  std::string device = "cpu";  // cpu or cuda
  CachePolicy policy;
  long budget_bytes = 0;       // pages and window state
  int page_size = 16;
  int max_batch = 1;           // the GPU engine sizes its buffers by these two
  int max_context = 0;         // 0: max_position_embeddings
  // The GPU engine launches each step ahead of the previous one's delivery where its method
  // allows (vanilla, dmc; DecodeEngine::set_launch_ahead).
  bool launch_ahead = true;
};

// The model must outlive a CPU engine (the GPU one copies the weights).
absl::StatusOr<std::unique_ptr<DecodeEngine>> CreateEngine(model::Llama<float>& model,
                                                           const EngineSpec& spec);

}  // namespace dmc::inference
