// DMS eviction decisions on the GPU (spec: kernels/dms_gates.h): one thread per (b, t, KV head),
// fp32. The mask of key t reads the decision logit of token t+1, recomputed from x and noise
// rather than read back, so the forward is a single pass with no ordering between threads.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using kernels::DmcDecisionMode;

struct GateArgs {
  float scale, offset, temperature;
  bool relaxed;
};

__device__ __forceinline__ float decision_logit(const float* x, const float* noise, long i,
                                                const GateArgs& p) {
  const float a = p.scale * x[i] - p.offset;
  return p.relaxed ? (a + noise[i]) / p.temperature : a;
}

__global__ void dms_gates_forward_kernel(float* logit, float* alpha, float* evict, float* mask,
                                         const float* x, const float* noise, int T, int Hkv,
                                         long total, GateArgs p) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int t = static_cast<int>((i / Hkv) % T);
  const float l = decision_logit(x, noise, i, p);
  const float a = p.relaxed ? sigmoidf_(l) : (l > 0.f ? 1.f : 0.f);
  logit[i] = l;
  alpha[i] = a;
  if (evict) evict[i] = a >= 0.5f ? 1.f : 0.f;
  if (mask) {
    float m = 0.f;  // the last key has no next token
    if (t + 1 < T) {
      const float next = decision_logit(x, noise, i + Hkv, p);
      m = p.relaxed ? logsigmoidf_(-next) : (next > 0.f ? -INFINITY : 0.f);
    }
    mask[i] = m;
  }
}

__global__ void dms_gates_backward_kernel(float* dx, const float* devict, const float* dmask,
                                          const float* logit, const float* alpha, int T, int Hkv,
                                          long total, GateArgs p, bool accumulate) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int t = static_cast<int>((i / Hkv) % T);
  // Straight-through slope: sigmoid'(logit), in kHard mode too.
  const float s = p.relaxed ? alpha[i] : sigmoidf_(logit[i]);
  float dlogit = devict ? devict[i] * s * (1.f - s) : 0.f;
  // mask[t-1] = logsigmoid(-logit[t]): d/dlogit[t] = -alpha[t]; the hard mask is a constant.
  if (dmask && p.relaxed && t >= 1) dlogit -= dmask[i - Hkv] * alpha[i];
  const float g = dlogit * (p.relaxed ? p.scale / p.temperature : p.scale);
  dx[i] = accumulate ? dx[i] + g : g;
}

GateArgs args_of(const kernels::DmsGateParams& params) {
  return GateArgs{params.scale, params.offset, params.temperature,
                  params.mode == DmcDecisionMode::kRelaxed};
}

}  // namespace

void dms_gates_forward(float* logit, float* alpha, float* evict, float* mask, const float* x,
                       const float* noise, int B, int T, int Hkv,
                       const kernels::DmsGateParams& params, cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * Hkv;
  if (total <= 0) return;
  dms_gates_forward_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(
      logit, alpha, evict, mask, x, noise, T, Hkv, total, args_of(params));
  DMC_CUDA_CHECK_LAUNCH();
}

void dms_gates_backward(float* dx, const float* devict, const float* dmask, const float* logit,
                        const float* alpha, int B, int T, int Hkv,
                        const kernels::DmsGateParams& params, bool accumulate,
                        cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * Hkv;
  if (total <= 0) return;
  dms_gates_backward_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(
      dx, devict, dmask, logit, alpha, T, Hkv, total, args_of(params), accumulate);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
