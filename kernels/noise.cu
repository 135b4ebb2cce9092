// Logistic noise on the GPU (spec: kernels/noise.h): the same counter-based hash_uniform as the
// CPU, so both backends draw the same uniforms; the logs are taken in double like the reference.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"
#include "kernels/noise.h"

namespace dmc::cuda {
namespace {
using namespace detail;

__global__ void logistic_noise_kernel(float* out, int B, int T, int Hkv_local, uint64_t seed,
                                      uint64_t stream_id, long seq0, int h0, int Hkv_total) {
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * Hkv_local) return;
  const int h = static_cast<int>(idx % Hkv_local);
  const int t = static_cast<int>((idx / Hkv_local) % T);
  const int b = static_cast<int>(idx / (static_cast<long>(Hkv_local) * T));
  const uint64_t i = (static_cast<uint64_t>(seq0 + b) * T + t) * Hkv_total + h0 + h;
  const double u1 = kernels::hash_uniform(seed, stream_id, 2 * i);
  const double u2 = kernels::hash_uniform(seed, stream_id, 2 * i + 1);
  const double g1 = -log(-log(u1)), g2 = -log(-log(u2));
  out[idx] = static_cast<float>(g1 - g2);
}

}  // namespace

void logistic_noise(float* out, int B, int T, int Hkv_local, uint64_t seed, uint64_t stream_id,
                    long seq0, int h0, int Hkv_total, cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * Hkv_local;
  if (total <= 0) return;
  logistic_noise_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(out, B, T, Hkv_local, seed,
                                                                 stream_id, seq0, h0, Hkv_total);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
