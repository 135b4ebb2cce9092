// What the CUDA benchmarks share: random device buffers (a counter-based hash, so no RNG state
// and no host round trip) and CUDA-event timing. Each benchmark is its own executable and includes
// this once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <utility>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::bench {
namespace {

using cuda::bf16;

// Uniform in (0, 1) from (seed, i): splitmix64 of a Weyl sequence.
__device__ inline float hash_uniform(uint64_t seed, size_t i) {
  uint64_t z = seed + i * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return (static_cast<float>(z >> 40) + 0.5f) / 16777216.0f;
}

// x[i] uniform with mean 0 and standard deviation `scale`.
__global__ void fill_bf16(bf16* x, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16((2.f * hash_uniform(seed, i) - 1.f) * 1.7320508f * scale);
}
// x[i] uniform in [lo, hi).
__global__ void fill_f32(float* x, size_t n, uint64_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] = lo + (hi - lo) * hash_uniform(seed, i);
}

template <typename T>
T* dalloc(size_t n) {
  T* p = nullptr;
  DMC_CUDA_CHECK(cudaMalloc(&p, sizeof(T) * n));
  return p;
}
// A new buffer of n random values; every call draws from a new seed.
bf16* rand_bf16(size_t n, float scale = 1.f) {
  static uint64_t seed = 1;
  bf16* p = dalloc<bf16>(n);
  fill_bf16<<<2048, 256>>>(p, n, ++seed * 0x1234567ULL, scale);
  DMC_CUDA_CHECK_LAUNCH();
  return p;
}
float* rand_f32(size_t n, float lo, float hi) {
  static uint64_t seed = 100;
  float* p = dalloc<float>(n);
  fill_f32<<<2048, 256>>>(p, n, ++seed * 0x7654321ULL, lo, hi);
  DMC_CUDA_CHECK_LAUNCH();
  return p;
}

// The middle value of v (the upper one of an even count).
float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median of `reps` CUDA-event timings of f (on the legacy default stream) after `warmup` calls.
float median_ms(const std::function<void()>& f, int reps, int warmup) {
  for (int i = 0; i < warmup; ++i) f();
  DMC_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  DMC_CUDA_CHECK(cudaEventCreate(&a));
  DMC_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    DMC_CUDA_CHECK(cudaEventRecord(a));
    f();
    DMC_CUDA_CHECK(cudaEventRecord(b));
    DMC_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    DMC_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  DMC_CUDA_CHECK_LAUNCH();
  DMC_CUDA_CHECK(cudaEventDestroy(a));
  DMC_CUDA_CHECK(cudaEventDestroy(b));
  return median(std::move(t));
}

// The GPU time of one call of f, for calls shorter than their own launch: `calls` calls of
// f(stream) captured into a CUDA graph, as a decode step runs them, and median_ms of that graph's
// launch divided by `calls`. stream must be a blocking one (cudaStreamCreate), so that
// median_ms's events on the legacy default stream bracket the graph; f must be capture-safe on it
// (cuBLASLt: matmul_bind_workspace first).
float graph_ms_per_call(const std::function<void(cudaStream_t)>& f, cudaStream_t stream,
                        int calls, int reps) {
  f(stream);  // outside the capture: lets a library settle its one-time set-up
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  DMC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) f(stream);
  DMC_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  DMC_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  DMC_CUDA_CHECK(cudaGraphDestroy(graph));
  const float ms =
      median_ms([&] { DMC_CUDA_CHECK(cudaGraphLaunch(exec, stream)); }, reps, 2) / calls;
  DMC_CUDA_CHECK(cudaGraphExecDestroy(exec));
  return ms;
}

// Prints the device's line ("GPU: name (N SMs)"), or "no CUDA device" and false: the benchmark
// then has nothing to run (exit 0, as on a machine without a GPU).
bool print_device() {
  if (!cuda::device_available()) {
    std::printf("no CUDA device\n");
    return false;
  }
  cudaDeviceProp prop;
  DMC_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("GPU: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
  return true;
}

}  // namespace
}  // namespace dmc::bench
