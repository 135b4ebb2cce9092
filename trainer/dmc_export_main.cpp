// dmc-export CKPT OUT: writes the (retrofitted) model of a training checkpoint as a Hugging Face
// checkpoint that transformers' LlamaForCausalLM loads, and that dmc-train --init_from reads back.
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "trainer/export.h"

ABSL_FLAG(std::string, dtype, "bf16", "weight dtype of the export: bf16, fp16 or fp32");
ABSL_FLAG(int64_t, max_shard_mb, 5000, "largest safetensors shard, in MB");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("dmc-export CHECKPOINT_DIR OUT_DIR [--dtype=bf16]");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 3) {
    std::fprintf(stderr, "usage: dmc-export CHECKPOINT_DIR OUT_DIR [--dtype=bf16|fp16|fp32]\n");
    return 2;
  }
  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  dmc::model::DType dtype;
  if (dtype_name == "bf16") dtype = dmc::model::DType::kBF16;
  else if (dtype_name == "fp16") dtype = dmc::model::DType::kF16;
  else if (dtype_name == "fp32") dtype = dmc::model::DType::kF32;
  else {
    std::fprintf(stderr, "dmc-export: --dtype must be bf16, fp16 or fp32, got '%s'\n", dtype_name.c_str());
    return 2;
  }
  const absl::Status s = dmc::trainer::ExportCheckpoint(
      args[1], args[2], dtype, absl::GetFlag(FLAGS_max_shard_mb) * 1000 * 1000);
  if (!s.ok()) {
    std::fprintf(stderr, "dmc-export: %s\n", s.ToString().c_str());
    return 1;
  }
  std::printf("dmc-export: wrote %s\n", args[2]);
  return 0;
}
