// Hugging Face Llama weights in and out of our model.
//
// Our tensor names and layouts are HF's own (q_proj/k_proj rows already in the rotate-half rotary
// layout that HF uses after its conversion from Meta's checkpoints), so import is a shape check, a
// dtype conversion and, under tensor parallelism, a slice of each split tensor.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "model/llama.h"
#include "model/safetensors.h"

namespace dmc::model {

// Loads every parameter of model (this TP rank's slice) from an HF checkpoint directory
// (model.safetensors or a sharded index). With tied embeddings an lm_head.weight in the file is
// ignored; without, it must be present. A DMS adapter the file lacks starts at unit norm and
// zero projection (a base model being retrofitted). Errors name the file, the tensor and the problem.
absl::Status ImportHfWeights(const std::string& dir, Llama<float>* model);

// Reads tensor spec.name of shape spec.full_shape from reader and copies the slice that spec
// describes (its rows or columns from spec.split_begin) into out.
template <typename Reader>
absl::Status ReadSlice(const Reader& reader, const ParamSpec& spec, float* out);

}  // namespace dmc::model
