// One full training step (forward, backward, gradient norm + clip + AdamW) of a ~1.4B Llama on
// one GPU through model::LlamaCuda, with DMC on (relaxed decisions, CR loss) and off:
// ms per step (and its forward / backward / optimizer parts), tokens/s, model TFLOP/s and MFU,
// against the bf16 dense peak (989 TFLOP/s, H100/H200 SXM datasheet) and against a cuBLAS GEMM
// ceiling measured in the same run.
//
//   bench_train_step [reps=10] [batch ...=2 4]
//
// Model FLOPs per token: 6 · (parameters − the embedding table, a lookup) + 6 · L · T · C for
// causal attention (QKᵀ and PV, half of the T×T products, forward + 2× backward), the figure
// dmc-train's MFU column uses. The DMC ops (gates, scan, CR loss) add no matrix FLOPs.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "model/config.h"
#include "model/llama_cuda.h"

namespace {
using dmc::cuda::bf16;

constexpr double kPeakTflops = 989.0;

dmc::model::LlamaConfig OneB() {
  dmc::model::LlamaConfig c;
  c.vocab_size = 32000;
  c.hidden_size = 2048;
  c.intermediate_size = 5632;
  c.num_hidden_layers = 24;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.max_position_embeddings = 4096;
  return c;
}

float Elapsed(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  DMC_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

// cuBLAS bf16 GEMM ceiling: 8192³ through the same matmul_forward the model uses.
double GemmCeilingTflops() {
  const int n = 8192;
  bf16 *a, *b, *c;
  DMC_CUDA_CHECK(cudaMalloc(&a, sizeof(bf16) * n * n));
  DMC_CUDA_CHECK(cudaMalloc(&b, sizeof(bf16) * n * n));
  DMC_CUDA_CHECK(cudaMalloc(&c, sizeof(bf16) * n * n));
  std::vector<bf16> host(static_cast<size_t>(n) * n);
  uint32_t s = 12345;
  for (auto& x : host) {
    s = s * 1664525u + 1013904223u;
    x = __float2bfloat16(((s >> 9) * (1.0f / 8388608.0f) - 0.5f) * 0.1f);
  }
  DMC_CUDA_CHECK(cudaMemcpy(a, host.data(), sizeof(bf16) * host.size(), cudaMemcpyHostToDevice));
  DMC_CUDA_CHECK(cudaMemcpy(b, host.data(), sizeof(bf16) * host.size(), cudaMemcpyHostToDevice));
  cudaEvent_t e0, e1;
  DMC_CUDA_CHECK(cudaEventCreate(&e0));
  DMC_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) dmc::cuda::matmul_forward(c, a, b, n, n, n);
  std::vector<float> times;
  for (int i = 0; i < 10; ++i) {
    DMC_CUDA_CHECK(cudaEventRecord(e0));
    dmc::cuda::matmul_forward(c, a, b, n, n, n);
    DMC_CUDA_CHECK(cudaEventRecord(e1));
    DMC_CUDA_CHECK(cudaEventSynchronize(e1));
    times.push_back(Elapsed(e0, e1));
  }
  std::sort(times.begin(), times.end());
  DMC_CUDA_CHECK(cudaEventDestroy(e0));
  DMC_CUDA_CHECK(cudaEventDestroy(e1));
  DMC_CUDA_CHECK(cudaFree(a));
  DMC_CUDA_CHECK(cudaFree(b));
  DMC_CUDA_CHECK(cudaFree(c));
  return 2.0 * n * n * n / (times[times.size() / 2] * 1e-3) / 1e12;
}

struct Row {
  int batch;
  bool dmc;
  double ms, fwd_ms, bwd_ms, opt_ms, tokens_per_s, tflops, loss, merge;
};

}  // namespace

int main(int argc, char** argv) {
  if (!dmc::cuda::device_available()) {
    std::printf("bench_train_step: no CUDA device\n");
    return 0;
  }
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 10;
  std::vector<int> batches;
  for (int i = 2; i < argc; ++i) batches.push_back(std::atoi(argv[i]));
  if (batches.empty()) batches = {2, 4};
  const int T = 2048;

  cudaDeviceProp prop;
  int dev = 0;
  DMC_CUDA_CHECK(cudaGetDevice(&dev));
  DMC_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  const double gemm = GemmCeilingTflops();

  dmc::model::LlamaConfig config = OneB();
  const long params = config.num_parameters();
  const double flops_per_token =
      6.0 * static_cast<double>(params - static_cast<long>(config.vocab_size) * config.hidden_size) +
      6.0 * config.num_hidden_layers * config.hidden_size * T;
  std::printf("bench_train_step: %s, Llama %.2fB parameters (L %d, d %d, %d heads of %d, ffn %d, "
              "vocab %d), T %d, %d timed steps after 2 warm-ups; cuBLAS GEMM ceiling %.0f TFLOP/s\n",
              prop.name, params / 1e9, config.num_hidden_layers, config.hidden_size,
              config.num_attention_heads, config.head_dim(), config.intermediate_size,
              config.vocab_size, T, reps, gemm);
  std::fflush(stdout);

  // Weights: small uniform values from an LCG (the host model's InitRandom draws 1.4B normals,
  // too slow for a benchmark set-up; timing does not depend on the values).
  std::vector<float> weights(static_cast<size_t>(params));  // the flat layout's size at TP 1
  uint32_t s = 777;
  for (auto& w : weights) {
    s = s * 1664525u + 1013904223u;
    w = ((s >> 9) * (1.0f / 8388608.0f) - 0.5f) * 0.04f;
  }

  std::vector<Row> rows;
  for (int B : batches) {
    for (bool dmc : {false, true}) {
      config.dmc.enabled = dmc;
      auto model = std::make_unique<dmc::model::LlamaCuda>(config);
      model->CopyParamsFromHost(weights);
      std::vector<int32_t> in(static_cast<size_t>(B) * T), tgt(in.size());
      uint32_t r = 99;
      for (size_t i = 0; i < in.size(); ++i) {
        r = r * 1664525u + 1013904223u;
        in[i] = static_cast<int32_t>((r >> 8) % config.vocab_size);
        tgt[i] = static_cast<int32_t>((r >> 4) % config.vocab_size);
      }
      dmc::model::StepOptions opt;
      opt.noise_seed = 1;
      opt.cr_prior = dmc ? 0.5f : 0.0f;
      dmc::model::CudaAdamWSettings adam;
      adam.lr = 1e-5f;
      cudaEvent_t e0, e1, e2, e3;
      for (cudaEvent_t* e : {&e0, &e1, &e2, &e3}) DMC_CUDA_CHECK(cudaEventCreate(e));
      std::vector<double> total, fwd, bwd, optm;
      dmc::model::ForwardResult last;
      for (int i = 0; i < reps + 2; ++i) {
        opt.step = i;
        DMC_CUDA_CHECK(cudaEventRecord(e0, model->stream()));
        model->ZeroGrad();
        last = model->Forward(in.data(), tgt.data(), B, T, opt);  // waits for its results
        DMC_CUDA_CHECK(cudaEventRecord(e1, model->stream()));
        model->Backward(1.0);
        DMC_CUDA_CHECK(cudaEventRecord(e2, model->stream()));
        model->OptimizerStep(adam);  // waits for the norm, and at its end
        DMC_CUDA_CHECK(cudaEventRecord(e3, model->stream()));
        DMC_CUDA_CHECK(cudaEventSynchronize(e3));
        if (i < 2) continue;
        total.push_back(Elapsed(e0, e3));
        fwd.push_back(Elapsed(e0, e1));
        bwd.push_back(Elapsed(e1, e2));
        optm.push_back(Elapsed(e2, e3));
      }
      for (cudaEvent_t e : {e0, e1, e2, e3}) DMC_CUDA_CHECK(cudaEventDestroy(e));
      auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      Row row;
      row.batch = B;
      row.dmc = dmc;
      row.ms = median(total);
      row.fwd_ms = median(fwd);
      row.bwd_ms = median(bwd);
      row.opt_ms = median(optm);
      row.tokens_per_s = B * T / (row.ms * 1e-3);
      row.tflops = row.tokens_per_s * flops_per_token / 1e12;
      row.loss = last.loss;
      row.merge = last.merge_fraction;
      rows.push_back(row);
      std::printf("  B %d DMC %-3s: %.1f ms/step (loss %.4f)\n", B, dmc ? "on" : "off", row.ms,
                  row.loss);
      std::fflush(stdout);
    }
  }

  std::printf("\n| B | DMC | ms/step | fwd ms | bwd ms | optimizer ms | tokens/s | model TFLOP/s | "
              "MFU (989) | MFU (GEMM %.0f) |\n",
              gemm);
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const Row& r : rows)
    std::printf("| %d | %s | %.1f | %.1f | %.1f | %.1f | %.0f | %.0f | %.1f%% | %.1f%% |\n",
                r.batch, r.dmc ? "on" : "off", r.ms, r.fwd_ms, r.bwd_ms, r.opt_ms, r.tokens_per_s,
                r.tflops, 100 * r.tflops / kPeakTflops, 100 * r.tflops / gemm);
  for (const Row& r : rows)
    if (r.dmc)
      for (const Row& o : rows)
        if (!o.dmc && o.batch == r.batch)
          std::printf("B %d: DMC on costs %.1f%% more time per step than off\n", r.batch,
                      100 * (r.ms / o.ms - 1));
  return 0;
}
