// dmc-serve --device=cuda as a process: SIGTERM in the middle of a stream ends it with a final
// event and the server exits 0. On the GPU this needs the signal mask set before the CUDA runtime
// starts its own threads (a thread that does not block SIGTERM takes it and the process dies:
// exit 143, seen on an H200); the CPU suite's twin (tests/test_serve.cpp) cannot see that. The
// budget for one sequence is counted at the engine's widths.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <string>
#include <vector>

#include "inference/cuda_engine.h"
#include "inference/paged_decoder.h"
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

// The budget check counts a whole-context sequence at the engine's widths: a budget between the
// GPU engine's bytes of one (bf16 pages) and the CPU's (fp32) serves on --device=cuda and is
// refused by name on --device=cpu.
TEST(CudaServe, BudgetForOneSequenceCountsTheEnginesWidths) {
  DMC_REQUIRE_GPU();
  serve_test::TempRoot root("dmc_cuda_serve_budget");
  const model::LlamaConfig c = GpuServeConfig();
  const std::string model_dir = serve_test::ExportRandomModel(c, 6, root.path);
  const inference::PagedCacheOptions shape =
      inference::CacheOptionsFor(c, inference::CacheMethod::kDmc, 0, 16);
  const std::vector<int> whole(size_t(c.num_hidden_layers) * c.num_key_value_heads,
                               c.max_position_embeddings);
  const double gpu_mib =
      inference::KvSequenceBytes(shape, whole, inference::CudaEngine::kElementBytes,
                                 inference::CudaEngine::kStateElementBytes) /
      double(1 << 20);
  const double cpu_mib = inference::KvSequenceBytes<float>(shape, whole) / double(1 << 20);
  ASSERT_LT(gpu_mib * 1.2, cpu_mib * 0.9);
  const std::string budget =
      "--kv_budget_mb=" + std::to_string((gpu_mib * 1.2 + cpu_mib * 0.9) / 2);
  {
    serve_test::Server server(model_dir, {"--device=cuda", budget});
    EXPECT_EQ(server.Terminate(), 0);
  }
  const serve_test::CommandRun run = serve_test::RunCommand(
      serve_test::InferenceBinary("dmc-serve") + " --model=" + model_dir +
      " --port=0 --device=cpu " + budget + " 2>&1");
  EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 1) << run.out;
  EXPECT_NE(run.out.find("holds less than one sequence of the whole context on --device=cpu"),
            std::string::npos)
      << run.out;
}

}  // namespace
}  // namespace dmc
