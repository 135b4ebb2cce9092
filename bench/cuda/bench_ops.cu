// Bandwidth / throughput of the non-attention CUDA kernels on Llama-1B-like shapes (8192 tokens,
// d = 2048, 16 heads of 128, MLP 5632, vocabulary 32000): median of CUDA-event timings after
// warm-up, bytes counted as each input read once and each output written once, against a
// device-to-device copy measured in the same run. Matmuls report TFLOP/s, except a decode step's
// projections at Llama 2 7B's shape and the 1B GQA shape (weight reads: GB/s). Last, the decode
// step's cache append at those two shapes (the 1B one also at 12 rows).
//   usage: bench_ops [reps]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include <cublas_v2.h>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "bench/cuda/bench_util.cuh"
#include "model/config.h"

// model/llama_cuda.cu's residual add, which the model keeps for the row-parallel projections under
// TP (declared where it is used).
namespace dmc::model::cuda_model_detail {
void add(dmc::cuda::bf16* out, const dmc::cuda::bf16* a, const dmc::cuda::bf16* b, size_t n,
         cudaStream_t stream);
}

namespace {
using dmc::cuda::bf16;
using dmc::bench::dalloc;
using dmc::bench::fill_f32;
using dmc::bench::rand_bf16;
using dmc::bench::rand_f32;

int g_reps = 20;
float time_ms(const std::function<void()>& f) { return dmc::bench::median_ms(f, g_reps, 3); }

double g_copy_gbs = 0;

// A decode step's projection: IC → OC, its output in bf16 or (the LM head) fp32.
struct Projection {
  const char* name;
  int IC, OC;
  bool f32_out;
};
void row_bw(const char* name, double bytes, const std::function<void()>& f) {
  const float ms = time_ms(f);
  const double gbs = bytes / ms * 1e-6;
  std::printf("%-44s %9.3f ms %8.0f GB/s %5.0f%% of copy\n", name, ms, gbs, 100.0 * gbs / g_copy_gbs);
  std::fflush(stdout);
}
void row_flops(const char* name, double flops, const std::function<void()>& f) {
  const float ms = time_ms(f);
  std::printf("%-44s %9.3f ms %8.1f TF/s\n", name, ms, flops / ms * 1e-9);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) g_reps = std::atoi(argv[1]);
  if (!dmc::bench::print_device()) return 0;
  const int B = 4, T = 2048, N = B * T, C = 2048, H = 16, Hkv = 16, D = 128, F = 5632, V = 32000;
  {
    const size_t n = size_t(1) << 30;  // 1 GiB each way
    char* a = dalloc<char>(n);
    char* b = dalloc<char>(n);
    const float ms = time_ms([&] { DMC_CUDA_CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); });
    g_copy_gbs = 2.0 * n / ms * 1e-6;
    std::printf("%-44s %9.3f ms %8.0f GB/s (read + write)\n", "device copy 1 GiB", ms, g_copy_gbs);
    cudaFree(a);
    cudaFree(b);
  }
  const double E = 2.0;  // bytes per bf16
  // RMSNorm
  bf16 *x = rand_bf16(size_t(N) * C), *w = rand_bf16(C), *y = rand_bf16(size_t(N) * C);
  bf16* dy = rand_bf16(size_t(N) * C);
  float* rstd = dalloc<float>(N);
  float* dw = rand_f32(C, 0, 0);
  row_bw("rmsnorm fwd N8192 C2048", E * 2 * N * C, [&] { dmc::cuda::rmsnorm_forward(y, rstd, x, w, N, C, 1e-5f); });
  // The backward reads dout and inp once for both gradients, and dinp when it adds; dinp is
  // written. The dweight partials (256 × C floats, 2 MB, written and read back) are not counted.
  row_bw("rmsnorm bwd (dinp += ; dweight +=)", E * 4 * N * C, [&] { dmc::cuda::rmsnorm_backward(y, dw, dy, x, w, rstd, N, C, true, true); });
  row_bw("rmsnorm bwd (dinp = ; dweight =)", E * 3 * N * C, [&] { dmc::cuda::rmsnorm_backward(y, dw, dy, x, w, rstd, N, C, false, false); });
  // RoPE on q [B, T, H, D]
  row_bw("rope fwd q B4 T2048 H16 D128", E * 2 * N * C, [&] { dmc::cuda::rope_forward(y, x, B, T, H, D, 0, 10000.f, true); });
  row_bw("rope bwd (dinp +=)", E * 3 * N * C, [&] { dmc::cuda::rope_backward(y, dy, B, T, H, D, 0, 10000.f, true, true); });
  row_bw("rope bwd (dinp =)", E * 2 * N * C, [&] { dmc::cuda::rope_backward(y, dy, B, T, H, D, 0, 10000.f, true, false); });
  // SwiGLU on the fused gate/up projection's rows [N, 2F], as the model runs it
  const size_t nf = size_t(N) * F;
  bf16 *gu = rand_bf16(2 * nf, 3.f), *o = rand_bf16(nf), *dg = rand_bf16(2 * nf);
  row_bw("swiglu fwd N8192 F5632", E * 3 * nf, [&] { dmc::cuda::swiglu_forward(o, gu, gu + F, N, F, 2 * F); });
  row_bw("swiglu bwd (dgate += ; dup +=)", E * 7 * nf, [&] { dmc::cuda::swiglu_backward(dg, dg + F, o, gu, gu + F, N, F, 2 * F, true); });
  row_bw("swiglu bwd (dgate = ; dup =)", E * 5 * nf, [&] { dmc::cuda::swiglu_backward(dg, dg + F, o, gu, gu + F, N, F, 2 * F, false); });
  // What the step spent before each written gradient: zeroing it (dgate's size here).
  row_bw("memset N8192 F5632 bf16", E * nf, [&] { DMC_CUDA_CHECK(cudaMemsetAsync(dg, 0, sizeof(bf16) * nf)); });
  cudaFree(gu), cudaFree(o), cudaFree(dg);
  // Matmuls (QKV, MLP up, LM head)
  {
    bf16* wq = rand_bf16(size_t(3 * C) * C, 0.02f);
    bf16* out = rand_bf16(size_t(N) * 3 * C);
    float* dwq = rand_f32(size_t(3 * C) * C, 0, 0);
    row_flops("matmul fwd N8192 IC2048 OC6144", 2.0 * N * C * 3 * C, [&] { dmc::cuda::matmul_forward(out, x, wq, N, C, 3 * C); });
    row_flops("matmul bwd (dinp and dweight)", 4.0 * N * C * 3 * C, [&] { dmc::cuda::matmul_backward(y, dwq, out, x, wq, N, C, 3 * C, true); });
    row_flops("matmul bwd dinp (+=, beta 1)", 2.0 * N * C * 3 * C, [&] { dmc::cuda::matmul_backward(y, nullptr, out, x, wq, N, C, 3 * C, true); });
    row_flops("matmul bwd dinp (=, beta 0)", 2.0 * N * C * 3 * C, [&] { dmc::cuda::matmul_backward(y, nullptr, out, x, wq, N, C, 3 * C, false); });
    // The fp32 weight gradient: added into (a later micro-batch) or written (the first after
    // ZeroGrad, which then needs no memset of it: the row below it is that memset).
    row_flops("matmul bwd dweight fp32 (+=, beta 1)", 2.0 * N * C * 3 * C, [&] { dmc::cuda::matmul_backward(nullptr, dwq, out, x, wq, N, C, 3 * C, true); });
    row_flops("matmul bwd dweight fp32 (=, beta 0)", 2.0 * N * C * 3 * C, [&] { dmc::cuda::matmul_backward(nullptr, dwq, out, x, wq, N, C, 3 * C, false); });
    row_bw("memset dweight fp32 2048x6144", 4.0 * 3 * C * C, [&] { DMC_CUDA_CHECK(cudaMemsetAsync(dwq, 0, sizeof(float) * 3 * C * C)); });
    cudaFree(wq), cudaFree(out), cudaFree(dwq);
  }
  // A projection onto the residual stream, o_proj's (IC 2048) and down_proj's (IC 5632) at one
  // rank: the GEMM into a temporary and the add (what the model does under TP), against the one
  // GEMM that adds the residual in its epilogue. The difference is the add's traffic: 3 · N · C
  // bf16 (the add reads the temporary and the residual, writes the sum), less the residual the
  // fused GEMM reads.
  {
    bf16 *inp = rand_bf16(size_t(N) * F), *wo = rand_bf16(size_t(C) * F, 0.02f);
    bf16 *proj = rand_bf16(size_t(N) * C), *x2 = rand_bf16(size_t(N) * C);
    for (int IC : {C, F}) {
      const double flops = 2.0 * N * IC * C;
      char name[64];
      std::snprintf(name, sizeof name, "matmul fwd N%d IC%d OC%d", N, IC, C);
      row_flops(name, flops, [&] { dmc::cuda::matmul_forward(proj, inp, wo, N, IC, C); });
      std::snprintf(name, sizeof name, "matmul fwd + add N%d IC%d OC%d", N, IC, C);
      row_flops(name, flops, [&] {
        dmc::cuda::matmul_forward(proj, inp, wo, N, IC, C);
        dmc::model::cuda_model_detail::add(x2, x, proj, size_t(N) * C, nullptr);
      });
      std::snprintf(name, sizeof name, "matmul fwd + residual N%d IC%d OC%d", N, IC, C);
      row_flops(name, flops, [&] { dmc::cuda::matmul_forward_residual(x2, inp, wo, x, N, IC, C); });
    }
    row_bw("residual add N8192 C2048", E * 3 * N * C, [&] { dmc::model::cuda_model_detail::add(x2, x, proj, size_t(N) * C, nullptr); });
    cudaFree(inp), cudaFree(wo), cudaFree(proj), cudaFree(x2);
  }
  // A decode step's projections at Llama 2 7B's shape (d 4096, MLP 11008, vocabulary 32000) for
  // batches of 1 to 8: matmul_forward's weight-streaming kernel (N ≤ 2; cuBLAS past it) against
  // the cuBLAS GEMM, on the same operands. Bytes: weights, inputs and outputs once. Each call reads
  // the next of enough weight copies to fill 256 MB, so no call finds its weights in L2 (in a
  // step, the other layers' weights have evicted them).
  {
    cublasHandle_t handle;
    if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) std::abort();
    for (const Projection& p : {Projection{"qkv", 4096, 12288, false}, {"o", 4096, 4096, false},
                                {"gate+up", 4096, 22016, false}, {"down", 11008, 4096, false},
                                {"lm_head fp32", 4096, 32000, true}}) {
      const size_t weights = size_t(p.OC) * p.IC;
      const int copies = int(std::max<size_t>(1, (size_t(256) << 20) / (E * weights)));
      bf16* wt = rand_bf16(weights * copies, 0.02f);
      for (int R : {1, 2, 4, 8}) {
        bf16* in = rand_bf16(size_t(R) * p.IC);
        void* out = dalloc<float>(size_t(R) * p.OC);
        const double bytes = E * (weights + size_t(R) * p.IC) + (p.f32_out ? 4 : E) * R * p.OC;
        int next = 0;
        auto weight = [&] { return wt + weights * (next++ % copies); };
        char name[64];
        std::snprintf(name, sizeof name, "decode %s N%d IC%d OC%d", p.name, R, p.IC, p.OC);
        row_bw(name, bytes, [&] {
          if (p.f32_out)
            dmc::cuda::matmul_forward_f32(static_cast<float*>(out), in, weight(), R, p.IC, p.OC);
          else
            dmc::cuda::matmul_forward(static_cast<bf16*>(out), in, weight(), R, p.IC, p.OC);
        });
        const float alpha = 1.f, beta = 0.f;
        row_bw("  cuBLAS, same shape", bytes, [&] {
          if (cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, p.OC, R, p.IC, &alpha, weight(),
                           CUDA_R_16BF, p.IC, in, CUDA_R_16BF, p.IC, &beta, out,
                           p.f32_out ? CUDA_R_32F : CUDA_R_16BF, p.OC, CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
            std::abort();
        });
        cudaFree(in), cudaFree(out);
      }
      cudaFree(wt);
    }
    cublasDestroy(handle);
  }
  // The 1B GQA shape's projections (bench_generate --shape=1b: d 2048, 32 heads / 4 KV heads of
  // 64, MLP 5632) at the rows its saturated steps run at 0.25 GiB (vanilla 11.6, CR 4 ~40, CR 8
  // ~76, padded as CudaEngine::PaddedRows pads them): Q, K and V as the engine runs them, and as
  // one GEMM over their adjacent weights. These calls are shorter than their launch, so each is
  // timed inside a CUDA graph of 64 calls, as a step runs them (the event timing above would
  // count the host's launch). Weight copies as above.
  {
    cudaStream_t stream;
    DMC_CUDA_CHECK(cudaStreamCreate(&stream));  // blocking: graph_ms_per_call's timing
    const size_t workspace_bytes = size_t(32) << 20;
    void* workspace = dalloc<char>(workspace_bytes);
    dmc::cuda::matmul_bind_workspace(stream, workspace, workspace_bytes);
    for (const Projection& p :
         {Projection{"q", 2048, 2048, false}, {"k or v", 2048, 256, false},
          {"q+k+v", 2048, 2560, false}, {"o", 2048, 2048, false}, {"gate+up", 2048, 11264, false},
          {"down", 5632, 2048, false}, {"lm_head fp32", 2048, 32000, true}}) {
      const size_t weights = size_t(p.OC) * p.IC;
      const int copies = int(std::max<size_t>(1, (size_t(256) << 20) / (E * weights)));
      bf16* wt = rand_bf16(weights * copies, 0.02f);
      for (int R : {16, 40, 80}) {
        bf16* in = rand_bf16(size_t(R) * p.IC);
        void* out = dalloc<float>(size_t(R) * p.OC);
        const double bytes = E * (weights + size_t(R) * p.IC) + (p.f32_out ? 4 : E) * R * p.OC;
        int next = 0;
        const float ms = dmc::bench::graph_ms_per_call(
            [&](cudaStream_t s) {
              const bf16* w = wt + weights * (next++ % copies);
              if (p.f32_out)
                dmc::cuda::matmul_forward_f32(static_cast<float*>(out), in, w, R, p.IC, p.OC, s);
              else
                dmc::cuda::matmul_forward(static_cast<bf16*>(out), in, w, R, p.IC, p.OC, s);
            },
            stream, 64, g_reps);
        const double gbs = bytes / ms * 1e-6;
        std::printf("decode 1b %-12s N%-2d IC%d OC%-5d       %9.4f ms %8.0f GB/s %5.0f%% of copy\n",
                    p.name, R, p.IC, p.OC, ms, gbs, 100.0 * gbs / g_copy_gbs);
        std::fflush(stdout);
        cudaFree(in), cudaFree(out);
      }
      cudaFree(wt);
    }
    dmc::cuda::matmul_bind_workspace(stream, nullptr, 0);
    DMC_CUDA_CHECK(cudaStreamDestroy(stream));
    cudaFree(workspace);
  }
  // Cross-entropy over V = 32000
  {
    const size_t nl = size_t(N) * V;
    bf16 *logits = rand_bf16(nl, 4.f), *dlogits = rand_bf16(nl, 0.f);
    int32_t* tgt = dalloc<int32_t>(N);
    std::vector<int32_t> ht(N);
    for (int i = 0; i < N; ++i) ht[i] = (i * 7919) % V;
    DMC_CUDA_CHECK(cudaMemcpy(tgt, ht.data(), sizeof(int32_t) * N, cudaMemcpyHostToDevice));
    float* losses = dalloc<float>(N);
    float* dl = rand_f32(N, 1.f / N, 1.f / N);
    row_bw("cross_entropy fwd N8192 V32000", E * nl, [&] { dmc::cuda::cross_entropy_forward(losses, logits, tgt, N, V); });
    row_bw("cross_entropy bwd (dlogits +=)", E * 3 * nl, [&] { dmc::cuda::cross_entropy_backward(dlogits, logits, tgt, dl, N, V, true); });
    row_bw("cross_entropy bwd (dlogits =)", E * 2 * nl, [&] { dmc::cuda::cross_entropy_backward(dlogits, logits, tgt, dl, N, V, false); });
    // embedding
    bf16* wte = rand_bf16(size_t(V) * C);
    float* dwte = rand_f32(size_t(V) * C, 0, 0);
    row_bw("embedding fwd", E * 2 * N * C, [&] { dmc::cuda::embedding_forward(y, tgt, wte, N, C); });
    row_bw("embedding bwd (sort + runs, fp32 +=)", E * N * C + 8.0 * N * C, [&] { dmc::cuda::embedding_backward(dwte, dy, tgt, N, C); });
    cudaFree(logits), cudaFree(dlogits), cudaFree(tgt), cudaFree(losses), cudaFree(dl), cudaFree(wte), cudaFree(dwte);
  }
  // AdamW + sum of squares over 100M parameters
  {
    const size_t np = 100000000;
    float *p = rand_f32(np, -1, 1), *gr = rand_f32(np, -1e-3f, 1e-3f), *m = rand_f32(np, 0, 0), *v = rand_f32(np, 0, 0);
    bf16* pb = dalloc<bf16>(np);
    double* ss = dalloc<double>(1);
    // As one tensor of a flat layout (the model's call covers all of its tensors in one launch).
    dmc::cuda::MultiTensorLayout layout({{0, np, true, false}});
    const dmc::cuda::AdamWStepArgs host_args = dmc::cuda::adamw_step_args(dmc::kernels::AdamWHyper{}, 0.f);
    dmc::cuda::AdamWStepArgs* args = dalloc<dmc::cuda::AdamWStepArgs>(1);
    DMC_CUDA_CHECK(cudaMemcpy(args, &host_args, sizeof(host_args), cudaMemcpyHostToDevice));
    row_bw("sum_of_squares 100M fp32 (multi-tensor)", np * 4.0, [&] { dmc::cuda::multi_tensor_sum_of_squares(ss, gr, layout, 1.0); });
    row_bw("adamw 100M params (+ bf16 copy, multi-tensor)", np * (4.0 * 4 + 3 * 4 + 2), [&] { dmc::cuda::multi_tensor_adamw(p, gr, m, v, pb, layout, args, ss); });
    cudaFree(p), cudaFree(gr), cudaFree(m), cudaFree(v), cudaFree(pb), cudaFree(ss), cudaFree(args);
  }
  // DMC head logic on k [B, T, Hkv, D]
  {
    const size_t ns = size_t(N) * Hkv;
    float *noise = dalloc<float>(ns), *logit = dalloc<float>(ns), *alpha = dalloc<float>(ns), *merge = dalloc<float>(ns),
          *mask = dalloc<float>(ns), *omega = dalloc<float>(ns), *den = dalloc<float>(ns);
    row_bw("logistic_noise B4 T2048 Hkv16", 4.0 * ns, [&] { dmc::cuda::logistic_noise(noise, B, T, Hkv, 1, 2, 0, 0, Hkv); });
    dmc::cuda::DmcGateTensors gt{logit, alpha, merge, mask, omega};
    dmc::kernels::DmcGateParams gp;
    row_bw("dmc_gates fwd", 4.0 * 6 * ns, [&] { dmc::cuda::dmc_gates_forward(gt, x, y, noise, B, T, H, Hkv, D, gp); });
    row_bw("dmc_gates bwd", 4.0 * 8 * ns, [&] { dmc::cuda::dmc_gates_backward(dy, y, alpha, merge, mask, omega, x, logit, alpha, B, T, H, Hkv, D, gp); });
    fill_f32<<<1024, 256>>>(alpha, ns, 7, 0.f, 1.f);
    fill_f32<<<1024, 256>>>(omega, ns, 8, 0.5f, 1.f);
    row_bw("dmc_scan fwd w12 (k or v)", E * 2 * N * C + 12.0 * ns, [&] { dmc::cuda::dmc_scan_forward(y, den, x, alpha, omega, B, T, Hkv, D, 12); });
    row_bw("dmc_scan bwd w12 (dx, dalpha, domega)", E * 4 * N * C + 20.0 * ns, [&] { dmc::cuda::dmc_scan_backward(dy, logit, merge, y, x, y, alpha, omega, den, B, T, Hkv, D, 12, false); });
    bf16 *x2 = rand_bf16(size_t(N) * C), *y2 = rand_bf16(size_t(N) * C), *dy2 = rand_bf16(size_t(N) * C);
    row_bw("dmc_scan_kv fwd w12 (k and v)", E * 4 * N * C + 12.0 * ns, [&] { dmc::cuda::dmc_scan_forward_kv(y, y2, den, x, x2, alpha, omega, B, T, Hkv, D, 12); });
    row_bw("dmc_scan_kv bwd w12 (dk, dv, dalpha, domega)", E * 8 * N * C + 20.0 * ns, [&] { dmc::cuda::dmc_scan_backward_kv(dy, dy2, logit, merge, y, y2, x, x2, y, y2, alpha, omega, den, B, T, Hkv, D, 12, false); });
    cudaFree(x2), cudaFree(y2), cudaFree(dy2);
    cudaFree(noise), cudaFree(logit), cudaFree(alpha), cudaFree(merge), cudaFree(mask), cudaFree(omega), cudaFree(den);
  }
  // A decode step's cache append (kernels/paged_kv_write.h) in one layer at DMC's saturated batch
  // (pages of 16, rows at 16 slots): Llama 2 7B's 124 rows of 32 KV heads of 128, half the heads
  // merging, and the 1B shape's 184 rows of 4 KV heads of 64, three in four merging (CR 4), and
  // its 12 rows (the engine's step took 9.8 µs an append there as at 42.6 rows, bench/RESULTS.md
  // entry 47). Vanilla, then DMC at the default window with the merging heads' rings full (each
  // merge reads w - 1 entries, each token writes one).
  struct AppendShape {
    int R, KvH, Dh, merge_in_4;
  };
  for (const AppendShape& sh :
       {AppendShape{124, 32, 128, 2}, AppendShape{184, 4, 64, 3}, AppendShape{12, 4, 64, 3}}) {
    const int R = sh.R, KvH = sh.KvH, Dh = sh.Dh, page = 16, w = dmc::model::DmcConfig{}.window;
    const int heads = R * KvH, calls = g_reps + 3;  // time_ms's warm-up and timed calls
    const int max_pages = (page + calls + page - 1) / page;
    std::vector<int32_t> table(size_t(heads) * max_pages), lengths(heads, page), counts(heads, w),
        positions(R);
    std::iota(table.begin(), table.end(), 0);
    std::iota(positions.begin(), positions.end(), 1000);
    std::vector<float> merges(heads);
    std::mt19937 draw(1);
    for (auto& m : merges) m = static_cast<int>(draw() % 4) < sh.merge_in_4 ? 1.f : 0.f;
    const double merging = std::count(merges.begin(), merges.end(), 1.f);
    auto upload = [](const auto& host) {
      auto* d = dalloc<std::decay_t<decltype(host[0])>>(host.size());
      DMC_CUDA_CHECK(cudaMemcpy(d, host.data(), host.size() * sizeof(host[0]), cudaMemcpyHostToDevice));
      return d;
    };
    dmc::cuda::PagedKv c;
    c.k_pool = rand_bf16(size_t(heads) * max_pages * page * Dh);
    c.v_pool = rand_bf16(size_t(heads) * max_pages * page * Dh);
    c.page_table = upload(table);
    c.lengths = dalloc<int32_t>(heads);
    c.window_count = upload(counts);
    c.max_pages = max_pages;
    c.page_size = page;
    int32_t* pos = upload(positions);
    bf16 *k = rand_bf16(size_t(heads) * Dh), *v = rand_bf16(size_t(heads) * Dh);
    float *merge = upload(merges), *omega = rand_f32(heads, 0.5f, 1.f);
    const double token = 2.0 * Dh * E + 4.0 * 2;  // k, v in; length, position
    char name[64];
    std::snprintf(name, sizeof name, "paged_kv_append vanilla R%d Hkv%d D%d", R, KvH, Dh);
    DMC_CUDA_CHECK(cudaMemcpy(c.lengths, lengths.data(), heads * sizeof(int32_t), cudaMemcpyHostToDevice));
    row_bw(name, heads * (token + 2.0 * Dh * E), [&] {
      dmc::cuda::paged_kv_append(c, k, v, nullptr, nullptr, pos, R, KvH, Dh, 10000.f, false);
    });
    c.window = rand_bf16(size_t(heads) * w * 2 * Dh);
    c.window_omega = rand_f32(size_t(heads) * w, 0.5f, 1.f);
    c.window_size = w;
    const double entry = 2.0 * Dh * E + 4;  // a ring entry: bf16 key and value, fp32 omega
    const double dmc_bytes = heads * (token + 4.0 * 3 + entry + 2.0 * Dh * E) + merging * (w - 1) * entry;
    DMC_CUDA_CHECK(cudaMemcpy(c.lengths, lengths.data(), heads * sizeof(int32_t), cudaMemcpyHostToDevice));
    std::snprintf(name, sizeof name, "paged_kv_append dmc w%d R%d Hkv%d D%d", w, R, KvH, Dh);
    row_bw(name, dmc_bytes, [&] {
      dmc::cuda::paged_kv_append(c, k, v, merge, omega, pos, R, KvH, Dh, 10000.f, true);
    });
    for (void* p : {(void*)c.k_pool, (void*)c.v_pool, (void*)c.page_table, (void*)c.lengths,
                    (void*)c.window_count, (void*)c.window, (void*)c.window_omega, (void*)pos,
                    (void*)k, (void*)v, (void*)merge, (void*)omega})
      cudaFree(p);
  }
  return 0;
}
