// DMC compression-ratio loss on the GPU (spec: kernels/cr_loss.h). Deterministic block sums.
#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {
namespace {
using namespace detail;

// The sum of merge over a sequence's T·Hkv decisions, in two deterministic passes: a grid of
// (sequence, chunk) blocks writes one partial sum each, then one thread per sequence adds its
// partials in chunk order. One block per sequence would leave most SMs idle at small B.
constexpr int kChunkElems = 4096;  // decisions per block of the first pass
constexpr int kMaxChunks = 64;     // per sequence

__global__ void cr_partial_sums_kernel(float* partials, const float* merge, long per_seq,
                                       int chunks) {
  const int b = blockIdx.y, chunk = blockIdx.x;
  const long per_chunk = (per_seq + chunks - 1) / chunks;
  const long begin = chunk * per_chunk, end = min(per_seq, begin + per_chunk);
  const float* m = merge + b * per_seq;
  float acc = 0.f;
  for (long i = begin + threadIdx.x; i < end; i += blockDim.x) acc += m[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[b * chunks + chunk] = acc;
}

__global__ void cr_add_partials_kernel(float* mean_merge, const float* partials, int B, int chunks,
                                       float scale) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  float acc = 0.f;
  for (int c = 0; c < chunks; ++c) acc += partials[b * chunks + c];
  mean_merge[b] += scale * acc;
}

__global__ void cr_accumulate_backward_kernel(float* dmerge, const float* dmean_merge, long per_seq,
                                              long total, float scale) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) dmerge[i] += scale * dmean_merge[i / per_seq];
}

__global__ void cr_loss_forward_kernel(float* loss, const float* mean_merge, int B, float prior) {
  float acc = 0.f;
  for (int b = threadIdx.x; b < B; b += blockDim.x) acc += fmaxf(prior - mean_merge[b], 0.f);
  acc = block_sum(acc);
  if (threadIdx.x == 0) *loss = acc / B;
}

__global__ void cr_loss_backward_kernel(float* dmean_merge, const float* mean_merge, int B,
                                        float prior, float dloss) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b < B && prior > mean_merge[b]) dmean_merge[b] += -dloss / B;
}

}  // namespace

void cr_accumulate_merge(float* mean_merge, const float* merge, int B, int T, int Hkv, float scale,
                         cudaStream_t stream) {
  const long per_seq = static_cast<long>(T) * Hkv;
  if (B <= 0 || per_seq <= 0) return;
  const int chunks = static_cast<int>(
      std::min<long>(kMaxChunks, (per_seq + kChunkElems - 1) / kChunkElems));
  float* partials =
      static_cast<float*>(scratch(kScratchCrLossPartials, sizeof(float) * size_t(B) * chunks));
  cr_partial_sums_kernel<<<dim3(chunks, B), 256, 0, stream>>>(partials, merge, per_seq, chunks);
  DMC_CUDA_CHECK_LAUNCH();
  cr_add_partials_kernel<<<ceil_div(B, 128), 128, 0, stream>>>(mean_merge, partials, B, chunks,
                                                               scale);
  DMC_CUDA_CHECK_LAUNCH();
}

void cr_accumulate_merge_backward(float* dmerge, const float* dmean_merge, int B, int T, int Hkv,
                                  float scale, cudaStream_t stream) {
  const long per = static_cast<long>(T) * Hkv, total = per * B;
  if (total <= 0) return;
  cr_accumulate_backward_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(dmerge, dmean_merge, per,
                                                                         total, scale);
  DMC_CUDA_CHECK_LAUNCH();
}

void cr_loss_forward(float* loss, const float* mean_merge, int B, float prior,
                     cudaStream_t stream) {
  cr_loss_forward_kernel<<<1, 256, 0, stream>>>(loss, mean_merge, B, prior);
  DMC_CUDA_CHECK_LAUNCH();
}

void cr_loss_backward(float* dmean_merge, const float* mean_merge, int B, float prior, float dloss,
                      cudaStream_t stream) {
  if (B <= 0) return;
  cr_loss_backward_kernel<<<ceil_div(B, 256), 256, 0, stream>>>(dmean_merge, mean_merge, B, prior,
                                                               dloss);
  DMC_CUDA_CHECK_LAUNCH();
}

}  // namespace dmc::cuda
