// DMC attention forward + backward on the GPU: time (median of CUDA-event timings after warm-up)
// and TFLOP/s, on random bf16 inputs with a soft DMC mask and the control channel excluded.
// FLOPs counted as for causal FlashAttention: forward 4·B·H·T²·D / 2, backward 2.5x forward.
// Forward and backward are timed for each kernel side by side: mma.sync ("fwd", "bwd") and, on
// Hopper, the sm90 kernels ("fwd90", "bwd90"; "fwd90p", "bwd90p" on their persistent schedules);
// f+b is the forward and backward that dmc_attention_forward/backward pick (kAuto), one after the
// other, with the time of each half in that run ("f+b: fwd", "f+b: bwd"). B4 H16 T2048 D128 is
// the 1.36B training step's attention (bench_train_step's 1b:4).
//   usage: bench_dmc_attention [reps] [B,H,Hkv,T,D]   (one table: the shapes below, or the one
//   named, e.g. for a profiler run on one shape)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "bench/cuda/bench_util.cuh"

namespace {
using dmc::cuda::bf16;

__global__ void fill_mask(float* m, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    m[i] = log1pf(-0.9f * dmc::bench::hash_uniform(seed, i));  // log(1 - alpha), alpha in (0, 0.9)
}

// A second of idle before each timing, so that every one starts from the same power state: an
// H100 drawing past its power cap after about a second of full load lowers its clocks (1.4-1.8
// GHz against 1.98 at T 8192, bench/RESULTS.md entry 38), and a column timed late in a shape's
// run would pay for the columns before it. bench/cuda/sdpa_anchor.py rests the same way.
void rest() { std::this_thread::sleep_for(std::chrono::seconds(1)); }

struct Shape {
  int B, H, Hkv, T, D;
};

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  std::vector<Shape> shapes = {{4, 32, 32, 1024, 128}, {4, 16, 16, 2048, 128},
                               {4, 32, 32, 4096, 128}, {4, 32, 32, 8192, 128},
                               {4, 32, 8, 4096, 128},  {4, 32, 32, 4096, 64}};
  if (argc > 2) {
    Shape s;
    if (std::sscanf(argv[2], "%d,%d,%d,%d,%d", &s.B, &s.H, &s.Hkv, &s.T, &s.D) != 5 || s.B < 1 ||
        s.Hkv < 1 || s.H % s.Hkv != 0 || s.T < 1 || (s.D != 64 && s.D != 128)) {
      std::fprintf(stderr, "bench_dmc_attention: shape '%s' is not B,H,Hkv,T,D (H a multiple of "
                   "Hkv, D 64 or 128)\n", argv[2]);
      return 1;
    }
    shapes = {s};
  }
  if (!dmc::bench::print_device()) return 0;
  const bool sm90 = dmc::cuda::device_is_sm90();
  std::printf("%-28s %9s %9s %10s %9s %9s %10s %9s %9s %10s %11s %9s %10s %11s %9s %11s %11s\n",
              "shape (B H/Hkv T D)", "fwd ms", "fwd90 ms", "fwd90p ms", "bwd ms", "bwd90 ms",
              "bwd90p ms", "f+b ms", "fwd TF/s", "fwd90 TF/s", "fwd90p TF/s", "bwd TF/s",
              "bwd90 TF/s", "bwd90p TF/s", "f+b TF/s", "f+b: fwd ms", "f+b: bwd ms");
  for (const Shape& s : shapes) {
    const size_t nq = static_cast<size_t>(s.B) * s.T * s.H * s.D;
    const size_t nk = static_cast<size_t>(s.B) * s.T * s.Hkv * s.D;
    const size_t nm = static_cast<size_t>(s.B) * s.T * s.Hkv;
    const size_t nl = static_cast<size_t>(s.B) * s.H * s.T;
    bf16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *mask, *lse, *dmask;
    DMC_CUDA_CHECK(cudaMalloc(&q, nq * 2));
    DMC_CUDA_CHECK(cudaMalloc(&o, nq * 2));
    DMC_CUDA_CHECK(cudaMalloc(&dout, nq * 2));
    DMC_CUDA_CHECK(cudaMalloc(&dq, nq * 2));
    DMC_CUDA_CHECK(cudaMalloc(&k, nk * 2));
    DMC_CUDA_CHECK(cudaMalloc(&v, nk * 2));
    DMC_CUDA_CHECK(cudaMalloc(&dk, nk * 2));
    DMC_CUDA_CHECK(cudaMalloc(&dv, nk * 2));
    DMC_CUDA_CHECK(cudaMalloc(&mask, nm * 4));
    DMC_CUDA_CHECK(cudaMalloc(&dmask, nm * 4));
    DMC_CUDA_CHECK(cudaMalloc(&lse, nl * 4));
    dmc::bench::fill_bf16<<<1024, 256>>>(q, nq, 1, 1.f);
    dmc::bench::fill_bf16<<<1024, 256>>>(k, nk, 2, 1.f);
    dmc::bench::fill_bf16<<<1024, 256>>>(v, nk, 3, 1.f);
    dmc::bench::fill_bf16<<<1024, 256>>>(dout, nq, 4, 1.f);
    dmc::bench::fill_bf16<<<1024, 256>>>(dq, nq, 5, 0.01f);
    dmc::bench::fill_bf16<<<1024, 256>>>(dk, nk, 6, 0.01f);
    dmc::bench::fill_bf16<<<1024, 256>>>(dv, nk, 7, 0.01f);
    fill_mask<<<1024, 256>>>(mask, nm, 8);
    DMC_CUDA_CHECK(cudaMemset(dmask, 0, nm * 4));
    DMC_CUDA_CHECK_LAUNCH();
    const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
    using dmc::cuda::AttentionKernel;
    auto fwd = [&](AttentionKernel kernel) {
      dmc::cuda::dmc_attention_forward(o, lse, q, k, v, mask, s.B, s.T, s.H, s.Hkv, s.D, true,
                                       scale, nullptr, 0, kernel);
    };
    auto bwd = [&](AttentionKernel kernel) {
      dmc::cuda::dmc_attention_backward(dq, dk, dv, dmask, dout, q, k, v, mask, o, lse, s.B, s.T,
                                        s.H, s.Hkv, s.D, true, scale, /*accumulate=*/false,
                                        nullptr, 0, kernel);  // written, as the model calls it
    };
    cudaEvent_t e0, e_mid, e1;
    DMC_CUDA_CHECK(cudaEventCreate(&e0));
    DMC_CUDA_CHECK(cudaEventCreate(&e_mid));
    DMC_CUDA_CHECK(cudaEventCreate(&e1));
    // median time of run() after 3 warm-ups, from a GPU at rest (rest() above)
    auto time_ms = [&](const std::function<void()>& run) {
      rest();
      return dmc::bench::median_ms(run, reps, 3);
    };
    // the backward reads the out and lse of the last forward timed before it
    const float mf = time_ms([&] { fwd(AttentionKernel::kMmaSync); });
    const float mb = time_ms([&] { bwd(AttentionKernel::kMmaSync); });
    const float mf90 = sm90 ? time_ms([&] { fwd(AttentionKernel::kSm90); }) : NAN;
    const float mf90p = sm90 ? time_ms([&] { fwd(AttentionKernel::kSm90Persistent); }) : NAN;
    const float mb90 = sm90 ? time_ms([&] { bwd(AttentionKernel::kSm90); }) : NAN;
    const float mb90p = sm90 ? time_ms([&] { bwd(AttentionKernel::kSm90Persistent); }) : NAN;
    // f+b as the model runs it, with an event between its two halves: each half in context
    // (after the other) beside its time alone above
    float mfb, mfb_f, mfb_b;
    {
      rest();
      for (int i = 0; i < 3; ++i) fwd(AttentionKernel::kAuto), bwd(AttentionKernel::kAuto);
      std::vector<float> total, first, second;
      for (int i = 0; i < reps; ++i) {
        DMC_CUDA_CHECK(cudaEventRecord(e0));
        fwd(AttentionKernel::kAuto);
        DMC_CUDA_CHECK(cudaEventRecord(e_mid));
        bwd(AttentionKernel::kAuto);
        DMC_CUDA_CHECK(cudaEventRecord(e1));
        DMC_CUDA_CHECK(cudaEventSynchronize(e1));
        float a, b;
        DMC_CUDA_CHECK(cudaEventElapsedTime(&a, e0, e_mid));
        DMC_CUDA_CHECK(cudaEventElapsedTime(&b, e_mid, e1));
        total.push_back(a + b), first.push_back(a), second.push_back(b);
      }
      mfb = dmc::bench::median(total), mfb_f = dmc::bench::median(first),
      mfb_b = dmc::bench::median(second);
    }
    const double flops_f = 4.0 * s.B * s.H * static_cast<double>(s.T) * s.T * s.D / 2.0;
    const double flops_b = 2.5 * flops_f;
    char label[64];
    std::snprintf(label, sizeof(label), "B%d H%d/%d T%d D%d", s.B, s.H, s.Hkv, s.T, s.D);
    std::printf("%-28s %9.3f %9.3f %10.3f %9.3f %9.3f %10.3f %9.3f %9.1f %10.1f %11.1f %9.1f "
                "%10.1f %11.1f %9.1f %11.3f %11.3f\n",
                label, mf, mf90, mf90p, mb, mb90, mb90p, mfb, flops_f / mf * 1e-9,
                flops_f / mf90 * 1e-9, flops_f / mf90p * 1e-9, flops_b / mb * 1e-9,
                flops_b / mb90 * 1e-9, flops_b / mb90p * 1e-9, (flops_f + flops_b) / mfb * 1e-9,
                mfb_f, mfb_b);
    std::fflush(stdout);
    for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
                    static_cast<void*>(o), static_cast<void*>(dout), static_cast<void*>(dq),
                    static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(mask),
                    static_cast<void*>(dmask), static_cast<void*>(lse)})
      DMC_CUDA_CHECK(cudaFree(p));
    DMC_CUDA_CHECK(cudaEventDestroy(e0));
    DMC_CUDA_CHECK(cudaEventDestroy(e_mid));
    DMC_CUDA_CHECK(cudaEventDestroy(e1));
  }
  return 0;
}
