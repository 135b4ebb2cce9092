// Linear layers through cuBLAS (spec: kernels/matmul.h): bf16 operands, fp32 accumulation
// (CUBLAS_COMPUTE_32F). Row-major nn.Linear buffers are read as their column-major transposes:
//   out^T[OC, N]   = W^T^T · inp^T        (W [OC, IC] row-major is a column-major IC x OC matrix)
//   dinp^T[IC, N] (+)= W^T · dout^T       (beta 1 accumulates, 0 writes without reading dinp)
//   dW^T[IC, OC]  (+)= inp^T · dout        (fp32 output; beta likewise)
#include <cublas_v2.h>

#include <cstdio>
#include <cstdlib>

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

cublasHandle_t handle_for(cudaStream_t stream) {
  static cublasHandle_t handle = nullptr;
  if (!handle) {
    DMC_CUBLAS_CHECK(cublasCreate(&handle));
    DMC_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  }
  DMC_CUBLAS_CHECK(cublasSetStream(handle, stream));
  return handle;
}

// out [N, OC] (type out_type) = inp [N, IC] · weight^T + beta · out.
void linear(void* out, cudaDataType out_type, float beta, const bf16* inp, const bf16* weight,
            int N, int IC, int OC, cudaStream_t stream) {
  if (N <= 0 || OC <= 0) return;
  const float alpha = 1.f;
  DMC_CUBLAS_CHECK(cublasGemmEx(handle_for(stream), CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &alpha,
                                weight, CUDA_R_16BF, IC, inp, CUDA_R_16BF, IC, &beta, out,
                                out_type, OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void matmul_reserve(cudaStream_t stream) { handle_for(stream); }

void matmul_forward(bf16* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                    cudaStream_t stream) {
  linear(out, CUDA_R_16BF, 0.f, inp, weight, N, IC, OC, stream);
}

void matmul_forward_add(bf16* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                        cudaStream_t stream) {
  linear(out, CUDA_R_16BF, 1.f, inp, weight, N, IC, OC, stream);
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
