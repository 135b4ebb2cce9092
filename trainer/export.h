// Training checkpoint → Hugging Face checkpoint (config.json with the DMC settings under "dmc",
// model.safetensors or shards + index), gathering tensor-parallel shards into full tensors.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "model/llama.h"
#include "model/safetensors.h"

namespace dmc::trainer {

// checkpoint: a checkpoint directory (its `latest` is followed) or one step_N directory.
absl::Status ExportCheckpoint(const std::string& checkpoint, const std::string& out_dir,
                              model::DType dtype, int64_t max_shard_bytes);

// A single-process model → the same Hugging Face layout (what ExportCheckpoint writes last).
absl::Status ExportModel(const model::Llama<float>& full, const std::string& out_dir,
                         model::DType dtype, int64_t max_shard_bytes);

// The step directory a checkpoint path refers to (following DIR/latest when present).
absl::StatusOr<std::string> ResolveStepDir(const std::string& checkpoint);

}  // namespace dmc::trainer
