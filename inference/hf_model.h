// Loads a Hugging Face checkpoint directory (config.json with the DMC settings, safetensors
// weights, as dmc-export writes it) into a single-process fp32 model for the inference tools.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/llama.h"

namespace dmc::inference {

// Errors name the directory or the file and the problem.
absl::StatusOr<std::unique_ptr<model::Llama<float>>> LoadHfModel(const std::string& dir);

}  // namespace dmc::inference
