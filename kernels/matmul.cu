// Linear layers through cuBLAS (spec: kernels/matmul.h): bf16 operands, fp32 accumulation
// (CUBLAS_COMPUTE_32F); the forward of a few rows (a decode step) through a kernel of ours, below.
// Row-major nn.Linear buffers are read as their column-major transposes:
//   out^T[OC, N]   = W^T^T · inp^T        (W [OC, IC] row-major is a column-major IC x OC matrix)
//   dinp^T[IC, N] (+)= W^T · dout^T       (beta 1 accumulates, 0 writes without reading dinp)
//   dW^T[IC, OC]  (+)= inp^T · dout        (fp32 output; beta likewise)
// The projection onto the residual stream, out = residual + inp · W^T with out != residual, is
// one cuBLASLt call, D = A·B + C (cublasGemmEx's C is also its output, so it would need a copy of
// the residual first). cuBLASLt converts the fp32 accumulator and C to the scale type (fp32 here),
// adds them there and converts only that sum to D's bf16 (CUBLASLT_MATMUL_DESC_SCALE_TYPE in
// cublasLt.h): the residual joins the sum before its one rounding, as in the reference.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <tuple>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

#define DMC_CUBLAS_CHECK(expr)                                                       \
  do {                                                                              \
    cublasStatus_t st_ = (expr);                                                    \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                             \
      std::fprintf(stderr, "cuBLAS error %d at %s:%d\n", static_cast<int>(st_), __FILE__, \
                   __LINE__);                                                       \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)

namespace dmc::cuda {
namespace {
using namespace detail;

// Workspaces bound to streams (matmul_bind_workspace); one host thread drives them.
std::map<cudaStream_t, std::pair<void*, size_t>>& bound_workspaces() {
  static std::map<cudaStream_t, std::pair<void*, size_t>> bound;
  return bound;
}

cublasHandle_t handle_for(cudaStream_t stream) {
  static cublasHandle_t handle = nullptr;
  if (!handle) {
    DMC_CUBLAS_CHECK(cublasCreate(&handle));
    DMC_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  }
  DMC_CUBLAS_CHECK(cublasSetStream(handle, stream));  // back to cuBLAS's default pool, too
  if (auto it = bound_workspaces().find(stream); it != bound_workspaces().end())
    DMC_CUBLAS_CHECK(cublasSetWorkspace(handle, it->second.first, it->second.second));
  return handle;
}

cublasLtHandle_t lt_handle() {
  static cublasLtHandle_t handle = nullptr;
  if (!handle) DMC_CUBLAS_CHECK(cublasLtCreate(&handle));
  return handle;
}

// cuBLASLt's workspace: 32 MiB, the size the cuBLAS documentation recommends for Hopper (its
// cublasSetWorkspace). A detail::scratch buffer like the kernels' own (kScratchLtWorkspace):
// allocated at the first call.
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

// The largest power of two, up to 256, that divides the address: the heuristic may only offer
// kernels whose vector accesses that alignment allows (its default assumes 256 for all four).
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (a % align) align /= 2;
  return align;
}

// One shape's descriptors and the algorithm the heuristic picked for it, made at its first call
// and kept for the process: a training step asks the heuristic nothing.
struct ResidualPlan {
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t a, b, c, d;
  cublasLtMatmulAlgo_t algo;
};

// N, IC, OC, the alignments of weight, inp, residual and out.
using PlanKey = std::tuple<int, int, int, uint32_t, uint32_t, uint32_t, uint32_t>;

const ResidualPlan& residual_plan(const bf16* out, const bf16* inp, const bf16* weight,
                                  const bf16* residual, int N, int IC, int OC) {
  const uint32_t align[4] = {alignment(weight), alignment(inp), alignment(residual),
                             alignment(out)};
  const PlanKey key{N, IC, OC, align[0], align[1], align[2], align[3]};
  static std::map<PlanKey, ResidualPlan> plans;  // like the handles: one host thread drives them
  if (auto it = plans.find(key); it != plans.end()) return it->second;

  ResidualPlan p;
  DMC_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T;
  DMC_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                                  sizeof(transpose)));
  // Column-major views, as in linear(): W is IC x OC (transposed by the op), inp IC x N, the
  // residual and out OC x N.
  DMC_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, IC, OC, IC));
  DMC_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, IC, N, IC));
  DMC_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_16BF, OC, N, OC));
  DMC_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, CUDA_R_16BF, OC, N, OC));

  cublasLtMatmulPreference_t pref;
  DMC_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t workspace = kLtWorkspaceBytes;
  DMC_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
  // A split-K sum may only meet in fp32: the INPLACE and OUTPUT_TYPE schemes add the parts in
  // bf16, which would round the product (and the residual) more than once.
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  DMC_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof(reduction)));
  const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i)
    DMC_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &align[i], sizeof(align[i])));
  cublasLtMatmulHeuristicResult_t found;
  int count = 0;
  DMC_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt_handle(), p.op, p.a, p.b, p.c, p.d, pref, 1,
                                                  &found, &count));
  DMC_CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  if (count == 0) {
    std::fprintf(stderr, "cuBLASLt has no algorithm for the residual GEMM N %d IC %d OC %d\n", N,
                 IC, OC);
    std::abort();
  }
  p.algo = found.algo;
  return plans.emplace(key, p).first->second;
}

// ---- A few rows (a decode step's batch): the product is the read of the weights ----
// With N rows every weight byte is used N times, so at N ≤ kFewRows the projection runs at the
// speed W is read, and cuBLAS read a 7B decode step's weights at 40–84% of the copy bandwidth
// (bench/RESULTS.md, entry 30). One warp per output column oc: the lanes read W's row oc in
// 16-byte vectors, kInFlight apiece before the first is used (enough bytes in flight to cover
// DRAM latency), streaming (each weight byte is read once per step, so it should not evict the
// inputs), and keep N fp32 dot products; inp's N rows (a few KB, read by every warp of the SM)
// come through L1. The lanes' sums meet by shuffles; lane r adds row r's addend (the residual,
// or out itself for out +=) and rounds once, as the reference does. Each weight vector costs the
// lanes ~17 instructions per row (x's load and unpacking, 8 FMAs), so more rows make the SM's
// issue rate, not DRAM, the bound: at 8 rows the kernel ran below cuBLAS's tensor cores, at 4
// the 7B decode step ran 9% slower than with cuBLAS, at 2 6% faster (bench/RESULTS.md entry 30).
constexpr int kFewRows = 2;
constexpr int kFewRowsWarps = 8;  // output columns per block
constexpr int kInFlight = 4;

template <int NR, typename Out>
__global__ void __launch_bounds__(kFewRowsWarps * 32)
    few_rows_kernel(Out* out, const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                    const bf16* addend, int IC, int OC) {
  const int lane = threadIdx.x % 32;
  const int oc = blockIdx.x * kFewRowsWarps + threadIdx.x / 32;
  if (oc >= OC) return;
  const uint4* w = reinterpret_cast<const uint4*>(weight + size_t(oc) * IC);
  const uint4* x = reinterpret_cast<const uint4*>(inp);
  const int vecs = IC / 8;  // 16-byte vectors in a row
  float acc[NR] = {};
  auto use = [&](uint4 wv, int v) {
    float wf[8];
    unpack8(wf, wv);
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      float xf[8];
      unpack8(xf, __ldg(x + size_t(r) * vecs + v));
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r] = fmaf(wf[j], xf[j], acc[r]);
    }
  };
  // The first weight vectors are prefetched into L2 before griddepcontrol.wait, so they stream in
  // while the kernel before this one (the producer of inp and the addend) finishes
  // (kernels/cuda_check.h, programmatic dependent launch). Into L2 only, never a register: L2 is
  // where the writes of that kernel land, so a prefetch cannot return a value older than them,
  // should it have written the weights (an optimizer step before a forward of 2 rows).
  int v = lane;
#pragma unroll
  for (int u = 0; u < kInFlight; ++u)
    if (v + 32 * u < vecs) prefetch_l2(w + v + 32 * u);
  producer_done();
  for (; v + 32 * (kInFlight - 1) < vecs; v += 32 * kInFlight) {
    uint4 wv[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) wv[u] = __ldcs(w + v + 32 * u);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) use(wv[u], v + 32 * u);
  }
  for (; v < vecs; v += 32) use(__ldcs(w + v), v);
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const float sum = warp_sum(acc[r]);
    if (lane == r) {
      const size_t i = size_t(r) * OC + oc;
      out[i] = Out(addend ? sum + bf(addend[i]) : sum);
    }
  }
}

// Whether the few-rows kernel takes the product: N small, rows in whole 16-byte vectors.
bool few_rows(const bf16* inp, const bf16* weight, int N, int IC) {
  return N <= kFewRows && IC % 8 == 0 && aligned16(inp, weight);
}

// out [N, OC] = inp · weight^T (+ addend [N, OC] when given, bf16 out only), N ≤ kFewRows.
template <typename Out, int NR = 1>
void launch_few_rows(Out* out, const bf16* inp, const bf16* weight, const bf16* addend, int N,
                     int IC, int OC, cudaStream_t stream) {
  if constexpr (NR < kFewRows) {
    if (N != NR) return launch_few_rows<Out, NR + 1>(out, inp, weight, addend, N, IC, OC, stream);
  }
  const int blocks = (OC + kFewRowsWarps - 1) / kFewRowsWarps;
  launch_dependent(few_rows_kernel<NR, Out>, blocks, kFewRowsWarps * 32, 0, stream, out, inp,
                   weight, addend, IC, OC);
}

// out [N, OC] (type out_type) = inp [N, IC] · weight^T + beta · out.
void linear(void* out, cudaDataType out_type, float beta, const bf16* inp, const bf16* weight,
            int N, int IC, int OC, cudaStream_t stream) {
  if (N <= 0 || OC <= 0) return;
  // The few-rows kernel writes (beta 0, bf16 or fp32 out) or adds into (beta 1, bf16 out).
  const bool written = beta == 0.f, added = beta == 1.f && out_type == CUDA_R_16BF;
  if (few_rows(inp, weight, N, IC) && (written || added)) {
    if (out_type == CUDA_R_32F)
      return launch_few_rows(static_cast<float*>(out), inp, weight, nullptr, N, IC, OC, stream);
    bf16* o = static_cast<bf16*>(out);
    return launch_few_rows(o, inp, weight, added ? o : nullptr, N, IC, OC, stream);
  }
  const float alpha = 1.f;
  DMC_CUBLAS_CHECK(cublasGemmEx(handle_for(stream), CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &alpha,
                                weight, CUDA_R_16BF, IC, inp, CUDA_R_16BF, IC, &beta, out,
                                out_type, OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void matmul_reserve(cudaStream_t stream) {
  handle_for(stream);
  lt_handle();
}

void matmul_bind_workspace(cudaStream_t stream, void* workspace, size_t bytes) {
  if (workspace == nullptr)
    bound_workspaces().erase(stream);
  else
    bound_workspaces()[stream] = {workspace, bytes};
}

void matmul_forward(bf16* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                    cudaStream_t stream) {
  linear(out, CUDA_R_16BF, 0.f, inp, weight, N, IC, OC, stream);
}

void matmul_forward_add(bf16* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                        cudaStream_t stream) {
  linear(out, CUDA_R_16BF, 1.f, inp, weight, N, IC, OC, stream);
}

void matmul_forward_residual(bf16* out, const bf16* inp, const bf16* weight, const bf16* residual,
                             int N, int IC, int OC, cudaStream_t stream) {
  if (N <= 0 || OC <= 0) return;
  if (out == residual) {  // the in-place GEMM (C == D) rounded ~29% of its outputs twice (H100)
    std::fprintf(stderr, "matmul_forward_residual: out must not be the residual\n");
    std::abort();
  }
  if (IC <= 0) {  // an empty product: out is the residual
    DMC_CUDA_CHECK(cudaMemcpyAsync(out, residual, sizeof(bf16) * N * OC, cudaMemcpyDeviceToDevice,
                                   stream));
    return;
  }
  if (few_rows(inp, weight, N, IC))
    return launch_few_rows(out, inp, weight, residual, N, IC, OC, stream);
  const ResidualPlan& p = residual_plan(out, inp, weight, residual, N, IC, OC);
  void* workspace = detail::scratch(detail::kScratchLtWorkspace, kLtWorkspaceBytes);
  const float alpha = 1.f, beta = 1.f;
  DMC_CUBLAS_CHECK(cublasLtMatmul(lt_handle(), p.op, &alpha, weight, p.a, inp, p.b, &beta,
                                  residual, p.c, out, p.d, &p.algo, workspace, kLtWorkspaceBytes,
                                  stream));
}

void matmul_forward_f32(float* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                        cudaStream_t stream) {
  linear(out, CUDA_R_32F, 0.f, inp, weight, N, IC, OC, stream);
}

void matmul_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                     const bf16* weight, int N, int IC, int OC, bool accumulate,
                     cudaStream_t stream) {
  if (N <= 0) {  // empty sums: a written dweight is zeros (dinp has no rows)
    if (dweight && !accumulate && OC > 0 && IC > 0)
      DMC_CUDA_CHECK(cudaMemsetAsync(dweight, 0, sizeof(float) * OC * IC, stream));
    return;
  }
  // cuBLAS reads no C when beta is 0 (NaN in dinp or dweight does not propagate), so no memset is
  // needed: the first micro-batch of a step writes the weight gradients, later ones add.
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  cublasHandle_t h = handle_for(stream);
  if (dinp)
    DMC_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &alpha, weight,
                                  CUDA_R_16BF, IC, dout, CUDA_R_16BF, OC, &beta, dinp,
                                  CUDA_R_16BF, IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (dweight)
    DMC_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &alpha, inp, CUDA_R_16BF,
                                  IC, dout, CUDA_R_16BF, OC, &beta, dweight, CUDA_R_32F, IC,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace dmc::cuda
