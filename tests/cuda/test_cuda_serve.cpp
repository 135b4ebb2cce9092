// dmc-serve --device=cuda as a process: SIGTERM in the middle of a stream ends it with a final
// event and the server exits 0. On the GPU this needs the signal mask set before the CUDA runtime
// starts its own threads (a thread that does not block SIGTERM takes it and the process dies:
// exit 143, seen on an H200); the CPU suite's twin (tests/test_serve.cpp) cannot see that.
#include <gtest/gtest.h>

#include "tests/cuda/cuda_test_util.h"
#include "tests/serve_process.h"

namespace dmc {
namespace {

// The byte tokenizer's vocabulary and head dim 64 (the GPU kernels take 64 and 128).
model::LlamaConfig GpuServeConfig() {
  model::LlamaConfig c = tiny_models::TinyLlama(259, 2);
  c.hidden_size = 128;
  c.intermediate_size = 96;
  c.num_attention_heads = 2;
  c.max_position_embeddings = 128;
  c.bos_token_id = 256;
  c.eos_token_id = 257;
  c.dmc.enabled = true;
  c.dmc.window = 4;
  return c;
}

TEST(CudaServe, SigtermEndsAStreamWithAFinalEventAndExitsZero) {
  DMC_REQUIRE_GPU();
  serve_test::TempRoot root("dmc_cuda_serve");
  const std::string model_dir = serve_test::ExportRandomModel(GpuServeConfig(), 5, root.path);
  serve_test::Server server(model_dir, {"--device=cuda", "--kv_budget_mb=16"});
  serve_test::ExpectSigtermEndsAStreamAndExitsZero(server, 120);
}

}  // namespace
}  // namespace dmc
