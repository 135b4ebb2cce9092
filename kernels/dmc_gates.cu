// DMC decisions and importances on the GPU (spec: kernels/dmc_gates.h): one thread per
// (b, t, KV head), fp32.
#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;
using kernels::DmcDecisionMode;

struct GateArgs {
  float init_val, temperature, omega_eps;
  bool relaxed;
};

// The logit of (token bt, KV head h) = idx, the token's key row k_ld elements from the last.
__device__ __forceinline__ float gate_logit(const bf16* k, long k_ld, const float* noise, long idx,
                                            int Hkv, int D, const GateArgs& p) {
  const float a = bf(k[(idx / Hkv) * k_ld + (idx % Hkv) * D + D - 1]) - p.init_val;
  return p.relaxed ? (a + noise[idx]) / p.temperature : a;
}

__global__ void gates_forward_kernel(DmcGateTensors out, const bf16* q, const bf16* k,
                                     const float* noise, int B, int T, int H, int Hkv, int D,
                                     long q_ld, long k_ld, GateArgs p) {
  producer_done();
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * Hkv) return;
  const int h = static_cast<int>(idx % Hkv);
  const long bt = idx / Hkv;
  const int t = static_cast<int>(bt % T);
  const int G = H / Hkv;
  const float logit = gate_logit(k, k_ld, noise, idx, Hkv, D, p);
  const float alpha = p.relaxed ? sigmoidf_(logit) : (logit > 0.f ? 1.f : 0.f);
  if (out.logit) out.logit[idx] = logit;
  if (out.alpha) out.alpha[idx] = alpha;
  if (out.merge) out.merge[idx] = p.relaxed ? (alpha >= 0.5f ? 1.f : 0.f) : alpha;
  if (out.omega) {
    float s = 0.f;
    const bf16* qh = q + bt * q_ld + static_cast<long>(h) * G * D + D - 1;
    for (int g = 0; g < G; ++g) s += bf(qh[static_cast<long>(g) * D]);
    out.omega[idx] = sigmoidf_(s / G + p.init_val) + p.omega_eps;
  }
  if (out.mask) {
    float m = 0.f;
    if (t < T - 1) {
      const float next = gate_logit(k, k_ld, noise, idx + Hkv, Hkv, D, p);
      m = p.relaxed ? logsigmoidf_(-next) : -50000.f * (next > 0.f ? 1.f : 0.f);
    }
    out.mask[idx] = m;
  }
}

__global__ void gates_backward_kernel(bf16* dq, bf16* dk, const float* dalpha, const float* dmerge,
                                      const float* dmask, const float* domega, const bf16* q,
                                      const float* logit, const float* alpha, int B, int T, int H,
                                      int Hkv, int D, GateArgs p) {
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(B) * T * Hkv) return;
  const int h = static_cast<int>(idx % Hkv);
  const long bt = idx / Hkv;
  const int t = static_cast<int>(bt % T);
  const int G = H / Hkv;
  // Straight-through slope: relaxed alpha = sigmoid(logit); hard uses sigmoid'(a) as well.
  const float s = p.relaxed ? alpha[idx] : sigmoidf_(logit[idx]);
  const float slope = s * (1.f - s);
  float dlogit = 0.f;
  if (dalpha) dlogit += dalpha[idx] * slope;
  if (dmerge) dlogit += dmerge[idx] * slope;
  // mask[t-1] = logsigmoid(-logit[t]) depends on this token's logit (relaxed only).
  if (dmask && p.relaxed && t >= 1) dlogit += dmask[idx - Hkv] * (-alpha[idx]);
  if (dk && dlogit != 0.f) {
    const float dkv = p.relaxed ? dlogit / p.temperature : dlogit;
    bf16* e = dk + idx * D + D - 1;
    *e = tobf(bf(*e) + dkv);
  }
  if (domega && dq) {
    float sum = 0.f;
    for (int g = 0; g < G; ++g) sum += bf(q[(bt * H + h * G + g) * D + D - 1]);
    const float sg = sigmoidf_(sum / G + p.init_val);
    const float dq_each = domega[idx] * sg * (1.f - sg) / G;
    for (int g = 0; g < G; ++g) {
      bf16* e = dq + (bt * H + h * G + g) * D + D - 1;
      *e = tobf(bf(*e) + dq_each);
    }
  }
}

GateArgs args_of(const kernels::DmcGateParams& params) {
  return GateArgs{params.init_val, params.temperature, params.omega_eps,
                  params.mode == DmcDecisionMode::kRelaxed};
}

}  // namespace

void dmc_gates_forward(const DmcGateTensors& out, const bf16* q, const bf16* k, const float* noise,
                       int B, int T, int H, int Hkv, int D, const kernels::DmcGateParams& params,
                       cudaStream_t stream, long qk_row_stride) {
  const long total = static_cast<long>(B) * T * Hkv;
  if (total <= 0) return;
  const long q_ld = row_stride_or(qk_row_stride, static_cast<long>(H) * D);
  const long k_ld = row_stride_or(qk_row_stride, static_cast<long>(Hkv) * D);
  launch_dependent(gates_forward_kernel, ceil_div(total, 256), 256, 0, stream, out, q, k, noise, B,
                   T, H, Hkv, D, q_ld, k_ld, args_of(params));
}

void dmc_gates_backward(bf16* dq, bf16* dk, const float* dalpha, const float* dmerge,
                        const float* dmask, const float* domega, const bf16* q, const float* logit,
                        const float* alpha, int B, int T, int H, int Hkv, int D,
                        const kernels::DmcGateParams& params, cudaStream_t stream) {
  const long total = static_cast<long>(B) * T * Hkv;
  if (total <= 0) return;
  gates_backward_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(
      dq, dk, dalpha, dmerge, dmask, domega, q, logit, alpha, B, T, H, Hkv, D, args_of(params));
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
