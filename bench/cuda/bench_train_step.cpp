// One full training step (forward, backward, gradient norm + clip + AdamW) through
// model::LlamaCuda, in the trainer's order (ForwardAsync, Backward, OptimizerStepAsync, then the
// reads), with DMC on (relaxed decisions, CR loss), off, or DMS (the query-channel variant, the
// paper's recipe: relaxed eviction decisions, the delayed-eviction mask, the CR loss and the
// distillation from a frozen bf16 teacher whose forward runs inside the step): ms per step (and its forward /
// backward / optimizer parts), tokens/s, model TFLOP/s and MFU, against the bf16 dense peak
// (989 TFLOP/s, H100/H200 SXM datasheet) and against a cuBLAS GEMM ceiling measured in the same
// run.
//
// Launch-bound or not: "host ms" is the host's time to enqueue a whole step (no wait inside it);
// "queued ms" is the device time of the same step enqueued while the stream is held by a host
// function, so the device runs it back to back with no launch gaps. ms/step ≈ queued ms means the
// device is the limit; ms/step ≈ host ms > queued ms means launches are (CUDA graphs would pay).
//
//   bench_train_step [--reps=10] [--warmup=2] [--shapes=1b:2,1b:4,medium:32] [--dmc=off,on,dms]
//                    [--gemm=true] [--queued=true]
//
// Shapes (bench/cuda/bench_shapes.h): 1b = a 1.36B Llama (24 layers, d 2048, 16 heads of 128,
// ffn 5632, vocab 32000, T 2048); 1b-2l = two of its layers (for per-kernel profiles); 7b-8l and
// 7b-8l-4k = eight layers of Llama 2 7B's width at T 2048 and 4096; 1b-gqa = the decoding
// benchmarks' 0.97B GQA shape (32 heads / 4 KV heads of 64); medium = the `medium` preset with
// the GPU pipeline's 8k vocabulary (17M parameters, T 512); NAME:B sets the batch. Model FLOPs per token: 6 · (parameters − the embedding table, a lookup)
// + 6 · L · T · C for causal attention (QKᵀ and PV, half of the T×T products, forward + 2×
// backward), the figure dmc-train's MFU column uses. The DMC ops add no matrix FLOPs; DMS's
// teacher forward is not counted (it is overhead, which the comparison with off shows).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "model/config.h"
#include "bench/cuda/bench_shapes.h"
#include "bench/cuda/kernel_trace.h"
#include "model/llama.h"
#include "model/llama_cuda.h"

ABSL_FLAG(int, reps, 10, "timed steps per configuration (medians are reported)");
ABSL_FLAG(int, warmup, 2, "untimed steps first (allocation, cuBLAS heuristics, graph capture)");
ABSL_FLAG(std::string, shapes, "1b:2,1b:4,medium:32", "NAME:BATCH list; NAME is a shape of bench/cuda/bench_shapes.h (1b, 1b-2l, 7b-8l, 7b-8l-4k, 1b-gqa, medium)");
ABSL_FLAG(std::string, dmc, "off,on", "compression settings to run: off, on (DMC) and/or dms");
ABSL_FLAG(bool, kernel_table, false,
          "after the timed steps, trace one more with CUPTI and print its kernels "
          "(bench/cuda/kernel_trace.h)");
ABSL_FLAG(bool, gemm, true, "measure the cuBLAS bf16 GEMM ceiling (8192³) first");
ABSL_FLAG(bool, queued, true,
          "also time the steps queued ahead of the device (off under a profiler, which serialises "
          "launches)");

namespace {
using dmc::cuda::bf16;
using dmc::bench::MakeShape;
using dmc::bench::Shape;

constexpr double kPeakTflops = 989.0;

float Elapsed(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  DMC_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
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
  std::vector<double> times;
  for (int i = 0; i < 10; ++i) {
    DMC_CUDA_CHECK(cudaEventRecord(e0));
    dmc::cuda::matmul_forward(c, a, b, n, n, n);
    DMC_CUDA_CHECK(cudaEventRecord(e1));
    DMC_CUDA_CHECK(cudaEventSynchronize(e1));
    times.push_back(Elapsed(e0, e1));
  }
  DMC_CUDA_CHECK(cudaEventDestroy(e0));
  DMC_CUDA_CHECK(cudaEventDestroy(e1));
  DMC_CUDA_CHECK(cudaFree(a));
  DMC_CUDA_CHECK(cudaFree(b));
  DMC_CUDA_CHECK(cudaFree(c));
  return 2.0 * n * n * n / (Median(times) * 1e-3) / 1e12;
}

// Holds the stream in a host function until released (or 10 s pass, so that a driver that made an
// enqueue wait for the stream cannot hang the benchmark; that run is then reported as such).
struct StreamGate {
  std::atomic<bool> open{false};
  bool timed_out = false;
  static void CUDART_CB Wait(void* self) {
    auto* g = static_cast<StreamGate*>(self);
    const auto start = std::chrono::steady_clock::now();
    while (!g->open.load(std::memory_order_acquire)) {
      if (std::chrono::steady_clock::now() - start > std::chrono::seconds(10)) {
        g->timed_out = true;
        return;
      }
      std::this_thread::yield();
    }
  }
};

enum class Compression { kOff, kDmc, kDms };
const char* CompressionName(Compression c) {
  return c == Compression::kOff ? "off" : c == Compression::kDmc ? "on" : "dms";
}

struct Row {
  std::string shape;
  int batch, T;
  Compression compression;
  double ms, fwd_ms, bwd_ms, opt_ms, host_ms, queued_ms, tokens_per_s, tflops, loss;
  bool gate_timed_out;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (!dmc::cuda::device_available()) {
    std::printf("bench_train_step: no CUDA device\n");
    return 0;
  }
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  const int warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  std::vector<Compression> settings;
  for (const std::string& d :
       std::vector<std::string>(absl::StrSplit(absl::GetFlag(FLAGS_dmc), ','))) {
    if (d != "on" && d != "off" && d != "dms") {
      std::fprintf(stderr, "bench_train_step: --dmc takes off, on and/or dms, got %s\n",
                   d.c_str());
      return 2;
    }
    settings.push_back(d == "on" ? Compression::kDmc : d == "dms" ? Compression::kDms
                                                                  : Compression::kOff);
  }

  cudaDeviceProp prop;
  int dev = 0;
  DMC_CUDA_CHECK(cudaGetDevice(&dev));
  DMC_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  const double gemm = absl::GetFlag(FLAGS_gemm) ? GemmCeilingTflops() : 0.0;
  std::printf("bench_train_step: %s, %d timed steps after %d warm-ups; cuBLAS GEMM ceiling %.0f "
              "TFLOP/s\n",
              prop.name, reps, warmup, gemm);
  std::fflush(stdout);

  std::vector<Row> rows;
  for (const std::string& spec :
       std::vector<std::string>(absl::StrSplit(absl::GetFlag(FLAGS_shapes), ','))) {
    const std::vector<std::string> parts = absl::StrSplit(spec, ':');
    int B = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[1], &B) || B <= 0) {
      std::fprintf(stderr, "bench_train_step: shape %s is not NAME:BATCH\n", spec.c_str());
      return 2;
    }
    Shape shape = MakeShape(parts[0]);
    dmc::model::LlamaConfig& config = shape.config;
    const int T = shape.T;
    const long params = config.num_parameters();
    const double flops_per_token =
        6.0 * static_cast<double>(params - static_cast<long>(config.vocab_size) * config.hidden_size) +
        6.0 * config.num_hidden_layers * config.hidden_size * T;
    std::printf("  %s: Llama %.3gM parameters (L %d, d %d, %d heads of %d, ffn %d, vocab %d), "
                "B %d × T %d\n",
                shape.name.c_str(), params / 1e6, config.num_hidden_layers, config.hidden_size,
                config.num_attention_heads, config.head_dim(), config.intermediate_size,
                config.vocab_size, B, T);
    // the flat layout's size at TP 1
    const std::vector<float> weights = dmc::bench::ArbitraryWeights(static_cast<size_t>(params), 777);
    for (const Compression compression : settings) {
      const bool dmc = compression == Compression::kDmc, dms = compression == Compression::kDms;
      dmc::model::LlamaConfig run_config = config;
      run_config.dmc.enabled = dmc;
      if (dms) {  // no new parameters: the same layout and weights as off
        run_config.dms.variant = dmc::model::DmsVariant::kQueryChannel;
        run_config.dms.enabled = true;
      }
      auto model = std::make_unique<dmc::model::LlamaCuda>(run_config);
      model->CopyParamsFromHost(weights);
      if (dms) {  // the teacher: the retrofit's starting model, a frozen bf16 copy on the device
        dmc::model::Llama<float> teacher(config, nullptr);
        std::copy(weights.begin(), weights.end(), teacher.params().begin());
        model->SetTeacher(teacher);
        model->set_distillation(true);
      }
      std::vector<int32_t> in, tgt;
      dmc::bench::ArbitraryTokens(B, T, config.vocab_size, 99, &in, &tgt);
      dmc::model::StepOptions opt;
      opt.noise_seed = 1;
      opt.cr_prior = dmc || dms ? 0.5f : 0.0f;
      dmc::model::CudaAdamWSettings adam;
      adam.lr = 1e-5f;
      cudaEvent_t e0, e1, e2, e3;
      for (cudaEvent_t* e : {&e0, &e1, &e2, &e3}) DMC_CUDA_CHECK(cudaEventCreate(e));
      const cudaStream_t st = model->stream();
      // One step in the trainer's order; returns the host's enqueue time in ms.
      auto enqueue = [&](int step) {
        opt.step = step;
        const auto t0 = std::chrono::steady_clock::now();
        DMC_CUDA_CHECK(cudaEventRecord(e0, st));
        model->ZeroGrad();
        model->ForwardAsync(in.data(), tgt.data(), B, T, opt);
        DMC_CUDA_CHECK(cudaEventRecord(e1, st));
        model->Backward(1.0);
        DMC_CUDA_CHECK(cudaEventRecord(e2, st));
        model->OptimizerStepAsync(adam);
        DMC_CUDA_CHECK(cudaEventRecord(e3, st));
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
            .count();
      };
      std::vector<double> total, fwd, bwd, optm, host, queued;
      dmc::model::ForwardResult last;
      bool gate_timed_out = false;
      int step = 0;
      for (int i = 0; i < warmup + reps; ++i, ++step) {
        const double h = enqueue(step);
        last = model->ForwardResults();
        model->OptimizerStepNorm();
        if (i < warmup) continue;
        host.push_back(h);
        total.push_back(Elapsed(e0, e3));
        fwd.push_back(Elapsed(e0, e1));
        bwd.push_back(Elapsed(e1, e2));
        optm.push_back(Elapsed(e2, e3));
      }
      // The same steps, queued ahead of the device.
      for (int i = 0; absl::GetFlag(FLAGS_queued) && i < reps; ++i, ++step) {
        StreamGate gate;
        DMC_CUDA_CHECK(cudaLaunchHostFunc(st, StreamGate::Wait, &gate));
        enqueue(step);
        gate.open.store(true, std::memory_order_release);
        model->ForwardResults();
        model->OptimizerStepNorm();
        gate_timed_out |= gate.timed_out;
        // A step of more launches than the driver's queue holds blocks the enqueue until the gate
        // gives up: nothing is measured then, so stop.
        if (gate.timed_out) break;
        queued.push_back(Elapsed(e0, e3));
      }
      if (absl::GetFlag(FLAGS_kernel_table)) {
        dmc::bench::KernelTrace trace;
        trace.Start();
        enqueue(step++);
        model->ForwardResults();
        model->OptimizerStepNorm();
        DMC_CUDA_CHECK(cudaStreamSynchronize(st));
        trace.Stop();
        trace.Print(absl::StrFormat("%s B %d DMC %s, one step", shape.name, B,
                                    CompressionName(compression)).c_str(),
                    1);
      }
      for (cudaEvent_t e : {e0, e1, e2, e3}) DMC_CUDA_CHECK(cudaEventDestroy(e));
      Row row;
      row.shape = shape.name;
      row.batch = B;
      row.T = T;
      row.compression = compression;
      row.ms = Median(total);
      row.fwd_ms = Median(fwd);
      row.bwd_ms = Median(bwd);
      row.opt_ms = Median(optm);
      row.host_ms = Median(host);
      row.queued_ms = queued.empty() ? 0.0 : Median(queued);
      row.gate_timed_out = gate_timed_out;
      row.tokens_per_s = B * T / (row.ms * 1e-3);
      row.tflops = row.tokens_per_s * flops_per_token / 1e12;
      row.loss = last.loss;
      rows.push_back(row);
      std::printf("  %s B %d DMC %-3s: %.2f ms/step, host enqueue %.2f ms, queued %.2f ms (loss "
                  "%.4f)\n",
                  shape.name.c_str(), B, CompressionName(compression), row.ms, row.host_ms, row.queued_ms,
                  row.loss);
      std::fflush(stdout);
    }
  }

  std::printf("\n| model | B × T | DMC | ms/step | fwd ms | bwd ms | optimizer ms | host enqueue ms "
              "| queued device ms | tokens/s | model TFLOP/s | MFU (989) | MFU (GEMM %.0f) |\n",
              gemm);
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const Row& r : rows)
    std::printf("| %s | %d × %d | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f%s | %.0f | %.0f | "
                "%.1f%% | %.1f%% |\n",
                r.shape.c_str(), r.batch, r.T, CompressionName(r.compression), r.ms, r.fwd_ms, r.bwd_ms,
                r.opt_ms, r.host_ms, r.queued_ms, r.gate_timed_out ? " (gate timed out)" : "",
                r.tokens_per_s, r.tflops, 100 * r.tflops / kPeakTflops,
                gemm > 0 ? 100 * r.tflops / gemm : 0.0);
  for (const Row& r : rows)
    if (r.compression != Compression::kOff)
      for (const Row& o : rows)
        if (o.compression == Compression::kOff && o.batch == r.batch && o.shape == r.shape)
          std::printf("%s B %d: %s costs %.1f%% more time per step than off\n", r.shape.c_str(),
                      r.batch, r.compression == Compression::kDmc ? "DMC" : "DMS (teacher included)",
                      100 * (r.ms / o.ms - 1));
  return 0;
}
