// Every CUDA entry point of the dmc kernels, in one header. The CPU headers (kernels/*.h) are the
// specification; each function here computes the same thing on device buffers, with these
// conventions:
//   - Activations, weights in compute form and activation gradients are bf16 (__nv_bfloat16);
//     arithmetic is fp32. Parameter gradients (dwte, RMSNorm dweight, matmul dweight) are fp32,
//     as are optimizer state and master weights, and the small per-(b, t, KV head) DMC tensors
//     (noise, logit, alpha, merge, mask, omega, denom and their gradients) and saved statistics
//     (rstd, lse, losses).
//   - Every backward ACCUMULATES (+=) into its gradient outputs, as the CPU references do.
//   - All work is enqueued on `stream` (default: the legacy default stream); nothing synchronises
//     with the host except the first use of a scratch size (allocation). Results that are scalars
//     (loss, sum of squares) stay on the device.
//   - Reductions are deterministic (fixed grid, fixed order), except the fp32 dq accumulation of
//     dmc_attention_backward, which uses atomics as FlashAttention does.
// This header is plain C++ (it includes only the CUDA runtime's host-compatible headers), so the
// model's CUDA backend can be compiled by the host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/adamw.h"
#include "kernels/dmc_gates.h"

namespace dmc::cuda {

using bf16 = __nv_bfloat16;

// True when a CUDA device is usable (cudaGetDeviceCount succeeds and returns > 0).
bool device_available();

// ---- embedding (kernels/embedding.h) ----
void embedding_forward(bf16* out, const int32_t* tokens, const bf16* wte, int N, int C,
                       cudaStream_t stream = nullptr);
// dwte[tokens[n], :] += dout[n, :]; deterministic (tokens are sorted on the device, one warp per
// distinct token sums its rows in order).
void embedding_backward(float* dwte, const bf16* dout, const int32_t* tokens, int N, int C,
                        cudaStream_t stream = nullptr);

// ---- RMSNorm (kernels/rmsnorm.h) ----
void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int N, int C,
                     float eps, cudaStream_t stream = nullptr);
void rmsnorm_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                      const bf16* weight, const float* rstd, int N, int C,
                      cudaStream_t stream = nullptr);

// ---- RoPE (kernels/rope.h); out may alias inp, dinp must not alias dout ----
void rope_forward(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0, float theta,
                  bool keep_last_channel, cudaStream_t stream = nullptr);
void rope_backward(bf16* dinp, const bf16* dout, int B, int T, int H, int D, int pos0, float theta,
                   bool keep_last_channel, cudaStream_t stream = nullptr);

// ---- SwiGLU (kernels/swiglu.h) ----
void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, size_t n,
                    cudaStream_t stream = nullptr);
void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     size_t n, cudaStream_t stream = nullptr);

// ---- softmax cross-entropy over the vocabulary (kernels/cross_entropy.h) ----
void cross_entropy_forward(float* losses, const bf16* logits, const int32_t* targets, int N, int V,
                           cudaStream_t stream = nullptr);
void cross_entropy_backward(bf16* dlogits, const bf16* logits, const int32_t* targets,
                            const float* dlosses, int N, int V, cudaStream_t stream = nullptr);

// ---- matmul, nn.Linear layout (kernels/matmul.h), cuBLAS, bf16 in, fp32 accumulate ----
void matmul_forward(bf16* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                    cudaStream_t stream = nullptr);
// dinp (bf16) += dout · weight ; dweight (fp32) += dout^T · inp ; either may be null.
void matmul_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                     const bf16* weight, int N, int IC, int OC, cudaStream_t stream = nullptr);

// ---- optimizer (kernels/adamw.h, kernels/grad_norm.h) ----
// One AdamW step on fp32 master weights; when param_bf16 is not null the updated parameter is also
// written there in bf16 (the compute copy).
void adamw_update(float* param, const float* grad, float* m, float* v, size_t n,
                  const kernels::AdamWHyper& hyper, float grad_scale, bf16* param_bf16 = nullptr,
                  cudaStream_t stream = nullptr);
// *out += sum_i x[i]^2, in double on the device (deterministic).
void sum_of_squares_accumulate(double* out, const float* x, size_t n,
                               cudaStream_t stream = nullptr);

// ---- stage-1 control-channel fading (kernels/control_channel.h): x [rows, D], x[r, D-1] *= m ----
void scale_last_channel(bf16* x, long rows, int D, float m, cudaStream_t stream = nullptr);

// ---- DMC (kernels/noise.h, dmc_gates.h, dmc_scan.h, cr_loss.h) ----
// Same counters and values as kernels::logistic_noise (logs in double, result rounded to fp32).
void logistic_noise(float* out, int B, int T, int Hkv_local, uint64_t seed, uint64_t stream_id,
                    long seq0, int h0, int Hkv_total, cudaStream_t stream = nullptr);

struct DmcGateTensors {  // all [B, T, Hkv] fp32; any may be null
  float* logit = nullptr;
  float* alpha = nullptr;
  float* merge = nullptr;
  float* mask = nullptr;
  float* omega = nullptr;
};
void dmc_gates_forward(const DmcGateTensors& out, const bf16* q, const bf16* k, const float* noise,
                       int B, int T, int H, int Hkv, int D, const kernels::DmcGateParams& params,
                       cudaStream_t stream = nullptr);
// Accumulates into dq[..., D-1] and dk[..., D-1]; any of dalpha, dmerge, dmask, domega may be null.
void dmc_gates_backward(bf16* dq, bf16* dk, const float* dalpha, const float* dmerge,
                        const float* dmask, const float* domega, const bf16* q, const float* logit,
                        const float* alpha, int B, int T, int H, int Hkv, int D,
                        const kernels::DmcGateParams& params, cudaStream_t stream = nullptr);

void dmc_scan_forward(bf16* xhat, float* denom, const bf16* x, const float* alpha,
                      const float* omega, int B, int T, int Hkv, int D, int window,
                      cudaStream_t stream = nullptr);
// Accumulates dx (bf16), dalpha, domega (fp32; either may be null).
void dmc_scan_backward(bf16* dx, float* dalpha, float* domega, const bf16* dxhat, const bf16* x,
                       const bf16* xhat, const float* alpha, const float* omega,
                       const float* denom, int B, int T, int Hkv, int D, int window,
                       cudaStream_t stream = nullptr);

void cr_accumulate_merge(float* mean_merge, const float* merge, int B, int T, int Hkv, float scale,
                         cudaStream_t stream = nullptr);
void cr_accumulate_merge_backward(float* dmerge, const float* dmean_merge, int B, int T, int Hkv,
                                  float scale, cudaStream_t stream = nullptr);
// *loss = (1/B) sum_b relu(prior - mean_merge[b])   (written, on the device)
void cr_loss_forward(float* loss, const float* mean_merge, int B, float prior,
                     cudaStream_t stream = nullptr);
void cr_loss_backward(float* dmean_merge, const float* mean_merge, int B, float prior, float dloss,
                      cudaStream_t stream = nullptr);

// ---- DMC attention (kernels/dmc_attention.h): fused flash-style kernels ----
// q [B, T, H, D], k/v [B, T, Hkv, D], out [B, T, H, D] bf16, contiguous and 16-byte aligned;
// mask [B, T, Hkv] fp32 or null; lse [B, H, T] fp32 (natural log, may be null in the forward).
// D must be 64 or 128 (aborts otherwise); any T >= 1; H % Hkv == 0.
void dmc_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                           const float* mask, int B, int T, int H, int Hkv, int D,
                           bool exclude_ctrl, float scale, cudaStream_t stream = nullptr);
// Accumulates dq, dk, dv (bf16) and dmask (fp32, may be null). Uses scratch for the fp32 dq
// accumulator [B, T, H, D] and the row statistics [B, H, T].
void dmc_attention_backward(bf16* dq, bf16* dk, bf16* dv, float* dmask, const bf16* dout,
                            const bf16* q, const bf16* k, const bf16* v, const float* mask,
                            const bf16* out, const float* lse, int B, int T, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale, cudaStream_t stream = nullptr);

// ---- paged decode attention (kernels/decode_attention.h) ----
// One new query token per sequence over a paged KV cache whose (sequence, KV head) pairs hold
// different numbers of slots; the arrays mean what they mean in kernels::paged_decode_attention:
//   q, out [B, H, D] bf16; k_pool, v_pool [pages, page_size, D] bf16 (rotated keys, values);
//   lengths [B, Hkv] int; page_table [B, Hkv, max_pages] int32; query head g reads KV head
//   g / (H / Hkv) (GQA); channel D-1 is left out of q·k when exclude_ctrl (DMC's control channel).
// Arithmetic is fp32 (online softmax in base 2); out is bf16. probs, when not null, receives the
// attention weights in fp32 (saved statistics are fp32): probs[(b·H + g)·probs_stride + i] for
// i < lengths[b, g / G]; nothing else of probs is written.
// Requirements: D 64 or 128 (aborts otherwise), H % Hkv == 0, 1 <= lengths <= max_pages·page_size
// (a head of length 0, which the cache never produces, gives zeros where the CPU reference gives
// NaN), q/out/k_pool/v_pool 16-byte aligned.
// Long heads are split into chunks of split_slots slots (flash-decoding; 0 chooses from B, Hkv,
// max_pages and the SM count) combined by a second pass; partial results live in scratch slot 10.
// Deterministic: fixed chunks, fixed reduction order.
void paged_decode_attention(bf16* out, float* probs, int probs_stride, const bf16* q,
                            const bf16* k_pool, const bf16* v_pool, const int32_t* page_table,
                            const int* lengths, int max_pages, int page_size, int B, int H,
                            int Hkv, int D, bool exclude_ctrl, float scale,
                            cudaStream_t stream = nullptr, int split_slots = 0);

}  // namespace dmc::cuda
