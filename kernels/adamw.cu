// AdamW on fp32 master weights (spec: kernels/adamw.h) and the deterministic sum of squares
// (spec: kernels/grad_norm.h) on the GPU, over every tensor of a flat parameter layout at once.
//
// Both kernels walk a chunk table (MultiTensorLayout): a CTA takes chunks blockIdx.x,
// blockIdx.x + gridDim.x, ... and its threads stride over the chunk's elements, 16-byte vectors
// where the chunk starts on a 4-element boundary (every tensor of a Llama layout does), scalars
// otherwise. One launch replaces one per tensor (219 for the 1.36B model, each with its own ramp and
// tail), and the clipping scale is computed on the device from the norm, so the host never waits.
#include <cmath>
#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

constexpr uint32_t kChunk = 32768;  // elements: ~20 chunks per CTA at 1.36B parameters
constexpr int kThreads = 256;
// Fixed grid (not derived from the device), so the summation order, hence the result, is the same
// on every GPU.
constexpr int kSsqBlocks = 1024;

struct alignas(8) Bf16x4 {  // the bf16 copy of a float4
  __nv_bfloat162 h[2];
};

__device__ __forceinline__ float adamw_one(float& p, float g, float& m, float& v,
                                           const AdamWStepArgs& a, float wd) {
  m = a.beta1 * m + (1.f - a.beta1) * g;
  v = a.beta2 * v + (1.f - a.beta2) * g * g;
  const float mhat = m / a.bias_correction1, vhat = v / a.bias_correction2;
  p -= a.lr * (mhat / (sqrtf(vhat) + a.eps) + wd * p);
  return p;
}

__global__ void mt_adamw_kernel(float* param, const float* grad, float* mom1, float* mom2,
                                bf16* param_bf16, const MultiTensorChunk* chunks, int num_chunks,
                                const AdamWStepArgs* args, const double* sumsq) {
  const AdamWStepArgs a = *args;
  // trainer::AdamW::Step's clipping: the norm in double, the scale rounded to fp32.
  const double norm = sqrt(*sumsq);
  // A non-finite norm (an overflow or a NaN anywhere in the gradients) skips the whole update,
  // which the trainer then counts as a skipped step (trainer::AdamW::Step does the same).
  if (!isfinite(norm)) return;
  const float gs =
      a.max_norm > 0.f && norm > a.max_norm ? static_cast<float>(a.max_norm / norm) : 1.f;
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const MultiTensorChunk ch = chunks[c];
    const float wd = ch.flags & kChunkDecay ? a.weight_decay : 0.f;
    float* p = param + ch.offset;
    const float* g = grad + ch.offset;
    float* m = mom1 + ch.offset;
    float* v = mom2 + ch.offset;
    bf16* pb = param_bf16 + ch.offset;
    uint32_t tail = 0;
    if ((ch.offset & 3) == 0) {  // the base pointers are cudaMalloc'ed (256-byte aligned)
      const uint32_t n4 = ch.size / 4;
      for (uint32_t i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 p4 = reinterpret_cast<float4*>(p)[i];
        const float4 g4 = reinterpret_cast<const float4*>(g)[i];
        float4 m4 = reinterpret_cast<float4*>(m)[i];
        float4 v4 = reinterpret_cast<float4*>(v)[i];
        const float q0 = adamw_one(p4.x, g4.x * gs, m4.x, v4.x, a, wd);
        const float q1 = adamw_one(p4.y, g4.y * gs, m4.y, v4.y, a, wd);
        const float q2 = adamw_one(p4.z, g4.z * gs, m4.z, v4.z, a, wd);
        const float q3 = adamw_one(p4.w, g4.w * gs, m4.w, v4.w, a, wd);
        reinterpret_cast<float4*>(p)[i] = p4;
        reinterpret_cast<float4*>(m)[i] = m4;
        reinterpret_cast<float4*>(v)[i] = v4;
        reinterpret_cast<Bf16x4*>(pb)[i] =
            Bf16x4{{__floats2bfloat162_rn(q0, q1), __floats2bfloat162_rn(q2, q3)}};
      }
      tail = 4 * n4;
    }
    for (uint32_t i = tail + threadIdx.x; i < ch.size; i += blockDim.x)
      pb[i] = tobf(adamw_one(p[i], g[i] * gs, m[i], v[i], a, wd));
  }
}

__global__ void mt_ssq_partial(double* partial, const float* x, const MultiTensorChunk* chunks,
                               int num_chunks) {
  double rep = 0.0, shard = 0.0;
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const MultiTensorChunk ch = chunks[c];
    const float* p = x + ch.offset;
    double acc = 0.0;
    uint32_t tail = 0;
    if ((ch.offset & 3) == 0) {
      const uint32_t n4 = ch.size / 4;
      for (uint32_t i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(p)[i];
        acc += static_cast<double>(v.x) * v.x + static_cast<double>(v.y) * v.y +
               static_cast<double>(v.z) * v.z + static_cast<double>(v.w) * v.w;
      }
      tail = 4 * n4;
    }
    for (uint32_t i = tail + threadIdx.x; i < ch.size; i += blockDim.x)
      acc += static_cast<double>(p[i]) * p[i];
    if (ch.flags & kChunkSharded)
      shard += acc;
    else
      rep += acc;
  }
  rep = block_sum(rep);
  shard = block_sum(shard);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = rep;
    partial[2 * blockIdx.x + 1] = shard;
  }
}

__global__ void mt_ssq_final(double* out, const double* partial, int nparts, double rep_weight) {
  double rep = 0.0, shard = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
    rep += partial[2 * i];
    shard += partial[2 * i + 1];
  }
  rep = block_sum(rep);
  shard = block_sum(shard);
  if (threadIdx.x == 0) *out = rep_weight * rep + shard;
}

}  // namespace

MultiTensorLayout::MultiTensorLayout(const std::vector<FlatTensor>& tensors) {
  std::vector<MultiTensorChunk> host;
  for (const FlatTensor& t : tensors)
    for (size_t done = 0; done < t.size; done += kChunk) {
      const size_t n = t.size - done < kChunk ? t.size - done : kChunk;
      host.push_back({static_cast<uint64_t>(t.offset + done), static_cast<uint32_t>(n),
                      (t.decay ? kChunkDecay : 0u) | (t.sharded ? kChunkSharded : 0u)});
    }
  num_chunks_ = static_cast<int>(host.size());
  DMC_CUDA_CHECK(cudaMalloc(&chunks_, sizeof(MultiTensorChunk) * (host.empty() ? 1 : host.size())));
  DMC_CUDA_CHECK(cudaMemcpy(chunks_, host.data(), sizeof(MultiTensorChunk) * host.size(),
                            cudaMemcpyHostToDevice));
  DMC_CUDA_CHECK(cudaMalloc(&partials_, sizeof(double) * 2 * kSsqBlocks));
}

MultiTensorLayout::~MultiTensorLayout() {
  DMC_CUDA_CHECK(cudaFree(chunks_));
  DMC_CUDA_CHECK(cudaFree(partials_));
}

void multi_tensor_sum_of_squares(double* sumsq, const float* x, const MultiTensorLayout& layout,
                                 double replicated_weight, cudaStream_t stream) {
  mt_ssq_partial<<<kSsqBlocks, kThreads, 0, stream>>>(layout.partials(), x, layout.chunks(),
                                                      layout.num_chunks());
  DMC_CUDA_CHECK_LAUNCH();
  mt_ssq_final<<<1, kThreads, 0, stream>>>(sumsq, layout.partials(), kSsqBlocks,
                                           replicated_weight);
  DMC_CUDA_CHECK_LAUNCH();
}

AdamWStepArgs adamw_step_args(const kernels::AdamWHyper& h, float max_norm) {
  AdamWStepArgs a;
  a.lr = h.lr;
  a.beta1 = h.beta1;
  a.beta2 = h.beta2;
  a.eps = h.eps;
  a.weight_decay = h.weight_decay;
  a.bias_correction1 = static_cast<float>(1.0 - std::pow(static_cast<double>(h.beta1), h.step));
  a.bias_correction2 = static_cast<float>(1.0 - std::pow(static_cast<double>(h.beta2), h.step));
  a.max_norm = max_norm;
  return a;
}

void multi_tensor_adamw(float* param, const float* grad, float* m, float* v, bf16* param_bf16,
                        const MultiTensorLayout& layout, const AdamWStepArgs* args,
                        const double* sumsq, cudaStream_t stream) {
  if (layout.num_chunks() == 0) return;
  int blocks = num_sms() * 16;
  if (blocks > layout.num_chunks()) blocks = layout.num_chunks();
  mt_adamw_kernel<<<blocks, kThreads, 0, stream>>>(param, grad, m, v, param_bf16, layout.chunks(),
                                                   layout.num_chunks(), args, sumsq);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
