// Every CUDA entry point of the dmc kernels, in one header. The CPU headers (kernels/*.h) are the
// specification; each function here computes the same thing on device buffers, with these
// conventions:
//   - Activations, weights in compute form and activation gradients are bf16 (__nv_bfloat16);
//     arithmetic is fp32. Parameter gradients (dwte, RMSNorm dweight, matmul dweight) are fp32,
//     as are optimizer state and master weights, and the small per-(b, t, KV head) DMC and DMS
//     tensors (noise, logit, alpha, merge, mask, omega, denom, the DMS decision input and their
//     gradients) and saved statistics (rstd, lse, losses, KL partials).
//   - Every backward's gradients, parameter and activation alike, follow its `accumulate`
//     argument, the same one as its CPU reference's (RMSNorm's backward takes one per gradient):
//     false writes them without reading them (no memset needed first), true adds into them.
//     Outputs an argument does not cover (dwte of the embedding's scatter, the DMC gate
//     gradients, dmc_gates_backward's dq and dk control channel, cr_loss's) always accumulate.
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

#include <climits>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/dmc_gates.h"
#include "kernels/dms_gates.h"
#include "kernels/kv_quant.h"
#include "kernels/loma_mask.h"
#include "kernels/paged_kv_dms_evict.h"
#include "kernels/paged_kv_drop.h"
#include "kernels/paged_kv_evict.h"
#include "kernels/paged_kv_pages.h"
#include "kernels/paged_kv_settle.h"
#include "kernels/paged_kv_write.h"
#include "kernels/sample.h"
#include "kernels/think_channels.h"

namespace dmc::cuda {

using bf16 = __nv_bfloat16;

// True when a CUDA device is usable (cudaGetDeviceCount succeeds and returns > 0).
bool device_available();
// True when the current device is a Hopper GPU (compute capability 9.0), which runs the sm_90a
// kernels (wgmma, TMA).
bool device_is_sm90();

// ---- embedding (kernels/embedding.h; wte holds the vocabulary rows [vocab_begin, vocab_begin +
// vocab_rows), tokens outside them give zero rows and no gradient) ----
void embedding_forward(bf16* out, const int32_t* tokens, const bf16* wte, int N, int C,
                       int vocab_begin = 0, int vocab_rows = INT_MAX, cudaStream_t stream = nullptr);
// dwte[tokens[n] - vocab_begin, :] += dout[n, :] (always adds); deterministic (tokens are sorted on
// the device, one warp per distinct token sums its rows in order).
void embedding_backward(float* dwte, const bf16* dout, const int32_t* tokens, int N, int C,
                        int vocab_begin = 0, int vocab_rows = INT_MAX,
                        cudaStream_t stream = nullptr);

// ---- RMSNorm (kernels/rmsnorm.h) ----
void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int N, int C,
                     float eps, cudaStream_t stream = nullptr);
// dinp and dweight (either may be null) are each written or added into: accumulate_dinp,
// accumulate_dweight (the CPU reference's one `accumulate` covers both). Together they take one
// pass over dout and inp, so a training step, which adds into the residual stream's gradient but
// may write the weight's, forms both in one call.
void rmsnorm_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                      const bf16* weight, const float* rstd, int N, int C, bool accumulate_dinp,
                      bool accumulate_dweight, cudaStream_t stream = nullptr);

// ---- RoPE (kernels/rope.h); out may alias inp, dinp must not alias dout ----
void rope_forward(bf16* out, const bf16* inp, int B, int T, int H, int D, int pos0, float theta,
                  bool keep_last_channel, cudaStream_t stream = nullptr);
void rope_backward(bf16* dinp, const bf16* dout, int B, int T, int H, int D, int pos0, float theta,
                   bool keep_last_channel, bool accumulate, cudaStream_t stream = nullptr);
// At explicit positions (kernels/rope_positions.h): positions is a device array [T], shared by
// the B sequences. The forward reads inp's tokens (b, t) inp_row_stride elements apart (0: H·D,
// packed; the decode step's queries are rows of its one Q, K, V product) and writes out packed.
void rope_forward_positions(bf16* out, const bf16* inp, int B, int T, int H, int D,
                            const int32_t* positions, float theta, bool keep_last_channel,
                            cudaStream_t stream = nullptr, long inp_row_stride = 0);
void rope_backward_positions(bf16* dinp, const bf16* dout, int B, int T, int H, int D,
                             const int32_t* positions, float theta, bool keep_last_channel,
                             bool accumulate, cudaStream_t stream = nullptr);

// ---- SwiGLU (kernels/swiglu.h): rows × F, gate and up (and dgate, dup) rows ld apart ----
void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, size_t rows, size_t F, size_t ld,
                    cudaStream_t stream = nullptr);
void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                     size_t rows, size_t F, size_t ld, bool accumulate,
                     cudaStream_t stream = nullptr);

// ---- softmax cross-entropy over the vocabulary (kernels/cross_entropy.h) ----
void cross_entropy_forward(float* losses, const bf16* logits, const int32_t* targets, int N, int V,
                           cudaStream_t stream = nullptr);
void cross_entropy_backward(bf16* dlogits, const bf16* logits, const int32_t* targets,
                            const float* dlosses, int N, int V, bool accumulate,
                            cudaStream_t stream = nullptr);
// Vocabulary-parallel form; stats [2, N], shard_stats [shards, 2, N], losses and lse [N] fp32.
void cross_entropy_shard_stats(float* stats, const bf16* logits, const int32_t* targets, int N,
                               int V, int vocab_begin, cudaStream_t stream = nullptr);
void cross_entropy_combine_shards(float* losses, float* lse, const float* shard_stats,
                                  const int32_t* targets, int N, int shards,
                                  cudaStream_t stream = nullptr);
void cross_entropy_shard_backward(bf16* dlogits, const bf16* logits, const float* lse,
                                  const int32_t* targets, const float* dlosses, int N, int V,
                                  int vocab_begin, bool accumulate,
                                  cudaStream_t stream = nullptr);

// ---- matmul, nn.Linear layout (kernels/matmul.h), cuBLAS, bf16 in, fp32 accumulate ----
// The forwards of at most 2 rows whose IC is a multiple of 8 (inp and weight 16-byte aligned) run
// a weight-streaming kernel of ours instead: a decode step's projections are W's read.
// Creates the cuBLAS and cuBLASLt handles now: a first GEMM inside a stream capture would create
// them there, and cublasCreate cannot run under capture. Call before capturing a graph that holds
// GEMMs (and run a matmul_forward_residual before that capture: its workspace is a scratch buffer).
void matmul_reserve(cudaStream_t stream = nullptr);
// GEMMs enqueued on `stream` use `workspace` (bytes, 256-byte aligned) as cuBLAS's; null unbinds.
// Streams whose GEMMs may run at once each take their own: cuBLAS's default pool then picks its
// implementations by what else runs, so results would vary from run to run.
void matmul_bind_workspace(cudaStream_t stream, void* workspace, size_t bytes);
void matmul_forward(bf16* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                    cudaStream_t stream = nullptr);
// out (bf16) += inp · weight^T: the residual add in the GEMM's epilogue (beta = 1).
void matmul_forward_add(bf16* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                        cudaStream_t stream = nullptr);
// out = residual + inp · weight^T, added before the one rounding to bf16 (kernels/matmul.h): the
// residual add in the epilogue of one cuBLASLt GEMM, whose algorithm is picked at the first call
// of each shape and pointer alignment and then reused. out overlaps no input (in place is
// refused).
void matmul_forward_residual(bf16* out, const bf16* inp, const bf16* weight, const bf16* residual,
                             int N, int IC, int OC, cudaStream_t stream = nullptr);
// fp32 out (logits that are scored and sampled: bf16 would round them by up to 1/16 at |l| ~ 10).
void matmul_forward_f32(float* out, const bf16* inp, const bf16* weight, int N, int IC, int OC,
                        cudaStream_t stream = nullptr);
// dinp (bf16) = dout · weight ; dweight (fp32) = dout^T · inp ; both = or += (accumulate); either
// may be null.
void matmul_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                     const bf16* weight, int N, int IC, int OC, bool accumulate,
                     cudaStream_t stream = nullptr);

// ---- optimizer over a flat parameter layout (kernels/adamw.h, kernels/grad_norm.h) ----
// One tensor of a flat layout (model::ParamSpec: offset, size, weight_decay, split_dim >= 0).
struct FlatTensor {
  size_t offset = 0, size = 0;
  bool decay = false;    // AdamW's weight decay applies to it
  bool sharded = false;  // split over the TP group; replicated tensors are weighted in the norm
};
// A piece of one tensor; one CTA works on one chunk at a time, so its weight decay and norm group
// are uniform. flags: kChunkDecay | kChunkSharded.
struct MultiTensorChunk {
  uint64_t offset;
  uint32_t size;
  uint32_t flags;
};
constexpr uint32_t kChunkDecay = 1, kChunkSharded = 2;
// The device table the multi-tensor kernels walk, built once per layout (allocates and copies
// synchronously): every tensor cut into chunks of at most 32768 elements, plus the norm's fixed
// per-CTA partial sums. Elements outside every tensor are never touched. Owns its device memory,
// so launches that use it can be captured into a CUDA graph.
class MultiTensorLayout {
 public:
  explicit MultiTensorLayout(const std::vector<FlatTensor>& tensors);
  ~MultiTensorLayout();
  MultiTensorLayout(const MultiTensorLayout&) = delete;
  MultiTensorLayout& operator=(const MultiTensorLayout&) = delete;
  const MultiTensorChunk* chunks() const { return chunks_; }
  int num_chunks() const { return num_chunks_; }
  double* partials() const { return partials_; }

 private:
  MultiTensorChunk* chunks_ = nullptr;
  int num_chunks_ = 0;
  double* partials_ = nullptr;
};

// *sumsq = replicated_weight · (sum of x[i]^2 over the replicated tensors) + (the same over the
// sharded ones), in double; written, not accumulated. Deterministic: a fixed grid and order,
// whatever the GPU. Two launches.
void multi_tensor_sum_of_squares(double* sumsq, const float* x, const MultiTensorLayout& layout,
                                 double replicated_weight, cudaStream_t stream = nullptr);

// The per-step AdamW scalars, read by multi_tensor_adamw from device memory (so that one captured
// launch serves every step). Fill them with adamw_step_args.
struct AdamWStepArgs {
  float lr, beta1, beta2, eps;
  float weight_decay;  // applied to the chunks flagged kChunkDecay
  float bias_correction1, bias_correction2;  // 1 - beta^t
  float max_norm;  // clip: <= 0 disables
};
// Bias corrections in double, rounded to fp32 (as the per-tensor kernel did).
AdamWStepArgs adamw_step_args(const kernels::AdamWHyper& hyper, float max_norm);
// One AdamW step (kernels::adamw_update) of every tensor of the layout, in one launch:
//   grad_scale = max_norm / sqrt(*sumsq) when max_norm > 0 and sqrt(*sumsq) > max_norm, else 1
// (the clipping of trainer::AdamW::Step, decided on the device; a non-finite norm skips the update
// and leaves every buffer as it was), weight decay on the decaying
// chunks only, the updated parameter also written to param_bf16 in bf16 (the compute copy).
// args and sumsq are device pointers.
void multi_tensor_adamw(float* param, const float* grad, float* m, float* v, bf16* param_bf16,
                        const MultiTensorLayout& layout, const AdamWStepArgs* args,
                        const double* sumsq, cudaStream_t stream = nullptr);

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
// q's and k's tokens (b, t) are qk_row_stride elements apart when it is not 0 (the decode step's
// rows of its one Q, K, V product), else packed (H·D and Hkv·D).
void dmc_gates_forward(const DmcGateTensors& out, const bf16* q, const bf16* k, const float* noise,
                       int B, int T, int H, int Hkv, int D, const kernels::DmcGateParams& params,
                       cudaStream_t stream = nullptr, long qk_row_stride = 0);
// Accumulates into dq[..., D-1] and dk[..., D-1]; any of dalpha, dmerge, dmask, domega may be null.
void dmc_gates_backward(bf16* dq, bf16* dk, const float* dalpha, const float* dmerge,
                        const float* dmask, const float* domega, const bf16* q, const float* logit,
                        const float* alpha, int B, int T, int H, int Hkv, int D,
                        const kernels::DmcGateParams& params, cudaStream_t stream = nullptr);

// Whether the scan's backward can stage the gates of a window over sequences of T tokens on this
// device (shared memory per block); a longer window aborts it. dmc_scan_max_window: the longest
// window that fits whatever T.
bool dmc_scan_window_fits(int T, int window);
int dmc_scan_max_window();
void dmc_scan_forward(bf16* xhat, float* denom, const bf16* x, const float* alpha,
                      const float* omega, int B, int T, int Hkv, int D, int window,
                      cudaStream_t stream = nullptr);
// dx (bf16) is written (accumulate false: no memset needed first) or accumulated; dalpha and
// domega (fp32; either may be null) always accumulate. Head dims up to 512 (256 for the _kv pair).
void dmc_scan_backward(bf16* dx, float* dalpha, float* domega, const bf16* dxhat, const bf16* x,
                       const bf16* xhat, const float* alpha, const float* omega,
                       const float* denom, int B, int T, int Hkv, int D, int window,
                       bool accumulate, cudaStream_t stream = nullptr);
// Keys and values of one layer at once (they share alpha, omega and denom): the same results as
// dmc_scan_forward on each, and as dmc_scan_backward on each with dalpha/domega receiving the sum
// of both contributions (up to fp32 summation order). 1 launch instead of 2 forward, 2 instead of
// 4 backward, and the gate gradients' pass runs once.
void dmc_scan_forward_kv(bf16* khat, bf16* vhat, float* denom, const bf16* k, const bf16* v,
                         const float* alpha, const float* omega, int B, int T, int Hkv, int D,
                         int window, cudaStream_t stream = nullptr);
void dmc_scan_backward_kv(bf16* dk, bf16* dv, float* dalpha, float* domega, const bf16* dkhat,
                          const bf16* dvhat, const bf16* k, const bf16* v, const bf16* khat,
                          const bf16* vhat, const float* alpha, const float* omega,
                          const float* denom, int B, int T, int Hkv, int D, int window,
                          bool accumulate, cudaStream_t stream = nullptr);

void cr_accumulate_merge(float* mean_merge, const float* merge, int B, int T, int Hkv, float scale,
                         cudaStream_t stream = nullptr);
void cr_accumulate_merge_backward(float* dmerge, const float* dmean_merge, int B, int T, int Hkv,
                                  float scale, cudaStream_t stream = nullptr);
// *loss = (1/B) sum_b relu(prior - mean_merge[b])   (written, on the device)
void cr_loss_forward(float* loss, const float* mean_merge, int B, float prior,
                     cudaStream_t stream = nullptr);
void cr_loss_backward(float* dmean_merge, const float* mean_merge, int B, float prior, float dloss,
                      cudaStream_t stream = nullptr);

// ---- DMS (kernels/dms_gates.h, kernels/kl_distill.h) ----
// x (the decision input), noise, logit, alpha, evict, mask, dx: [B, T, Hkv] fp32; evict and mask
// may be null, noise is read only in kRelaxed mode. The hard mask is -inf (dmc_attention takes it).
void dms_gates_forward(float* logit, float* alpha, float* evict, float* mask, const float* x,
                       const float* noise, int B, int T, int Hkv,
                       const kernels::DmsGateParams& params, cudaStream_t stream = nullptr);
// Writes or accumulates (accumulate) dx; devict and dmask may be null.
void dms_gates_backward(float* dx, const float* devict, const float* dmask, const float* logit,
                        const float* alpha, int B, int T, int Hkv,
                        const kernels::DmsGateParams& params, bool accumulate,
                        cudaStream_t stream = nullptr);
// Vocabulary-parallel KL(student || teacher): s, u [N, V] bf16 (this shard's rows of the student's
// and the teacher's logits); lse_s, lse_u (global logsumexps), weight, partial, kl [N] fp32.
void kl_distill_shard(float* partial, const bf16* s, const bf16* u, const float* lse_s,
                      const float* lse_u, const float* weight, int N, int V,
                      cudaStream_t stream = nullptr);
// ds (bf16) = or += (accumulate) dloss · weight[n] · p (log p - log p_t - kl[n]), kl the
// all-reduced partials.
void kl_distill_shard_backward(bf16* ds, const bf16* s, const bf16* u, const float* lse_s,
                               const float* lse_u, const float* kl, const float* weight,
                               float dloss, int N, int V, bool accumulate,
                               cudaStream_t stream = nullptr);

// ---- DMC attention (kernels/dmc_attention.h): fused flash-style kernels ----
// q [B, T, H, D], k/v [B, T, Hkv, D], out [B, T, H, D] bf16, contiguous and 16-byte aligned;
// mask [B, T, Hkv] fp32 or null, added where query - key > mask_window (DMC 0, DMS its window w;
// -inf allowed: DMS's hard mask); lse [B, H, T] fp32 (natural log, may be null in the forward).
// D must be 64 or 128, or 32 in the forward (inference's prompts: the portable kernel only);
// other head dims abort; any T >= 1; H % Hkv == 0.
// Two kernels compute each direction: the Hopper ones (wgmma, TMA; kernels/dmc_attention_sm90.cu,
// kernels/dmc_attention_bwd_sm90.cu) and the portable mma.sync ones. kAuto takes the Hopper
// kernels on sm_90 devices (at head dims 64 and 128; the forward at 32 is the portable one) on
// their persistent schedules (kSm90Persistent: a CTA per SM taking tiles one after another),
// unless the environment sets DMC_ATTENTION_KERNEL=mma_sync (the portable ones) or =sm90_grid
// (kSm90: the Hopper kernels on grid schedules, a CTA per tile); kSm90 and kSm90Persistent on
// another device abort.
enum class AttentionKernel { kAuto, kMmaSync, kSm90, kSm90Persistent };
void dmc_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                           const float* mask, int B, int T, int H, int Hkv, int D,
                           bool exclude_ctrl, float scale, cudaStream_t stream = nullptr,
                           int mask_window = 0, AttentionKernel kernel = AttentionKernel::kAuto);
// The Hopper forward kernel, as dmc_attention_forward with kSm90 (persistent: kSm90Persistent;
// shapes already checked there). With a mask it first writes it transposed into scratch as bias
// rows (fp32 [B, Hkv, T rounded up to 128]; allocated at the first call of a larger size only).
void dmc_attention_forward_sm90(bf16* out, float* lse, const bf16* q, const bf16* k,
                                const bf16* v, const float* mask, int B, int T, int H, int Hkv,
                                int D, bool exclude_ctrl, float scale, cudaStream_t stream,
                                int mask_window, bool persistent);
// Writes or accumulates (accumulate) dq, dk, dv (bf16) and dmask (fp32, may be null). Uses scratch
// for the fp32 dq accumulator [B, T, H, D] and the row statistics [B, H, T] (rows
// attention_stats_stride(T) apart).
void dmc_attention_backward(bf16* dq, bf16* dk, bf16* dv, float* dmask, const bf16* dout,
                            const bf16* q, const bf16* k, const bf16* v, const float* mask,
                            const bf16* out, const float* lse, int B, int T, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale, bool accumulate,
                            cudaStream_t stream = nullptr, int mask_window = 0,
                            AttentionKernel kernel = AttentionKernel::kAuto);
// Floats between the rows of the backward's row statistics: T rounded up to 4, so every row starts
// 16-byte aligned, as the Hopper kernel's TMA loads of them need.
inline int attention_stats_stride(int T) { return (T + 3) / 4 * 4; }
// The Hopper backward's main kernel, called by dmc_attention_backward between its
// pre-pass (delta = rowsum(dout · out), lse2 = lse · log2 e, both [B, H, T] with rows
// attention_stats_stride(T) apart, 16-byte aligned) and its post-pass (dq = or += dq_acc): adds
// scale · dQ into the fp32 dq_acc [B, T, H, D] (16-byte aligned; by TMA reduce-adds, the kernel's
// file says why) and writes or accumulates (accumulate) dk, dv, dmask. persistent: the kernel's
// persistent schedule (kSm90Persistent), else its grid one.
void dmc_attention_backward_sm90(float* dq_acc, bf16* dk, bf16* dv, float* dmask,
                                 const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                 const float* mask, const float* lse2, const float* delta, int B,
                                 int T, int H, int Hkv, int D, bool exclude_ctrl, float scale,
                                 bool accumulate, cudaStream_t stream, int mask_window,
                                 bool persistent);

// ---- LoMA attention (kernels/loma_attention.h): the block mask of kernels/loma_mask.h ----
// Same layouts as dmc_attention (q, out [B, T, H, D], k/v [B, T, Hkv, D] bf16, 16-byte aligned;
// lse [B, H, T] fp32, natural log, may be null in the forward); the mask is generated from the
// zone layout z (t >= 1, c >= 1) on the fly. D must be 64 or 128 (aborts otherwise); any T >= 1;
// H % Hkv == 0. Flash-style: online softmax, only lse saved, scores recomputed in the backward.
void loma_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                            int B, int T, int H, int Hkv, int D, const kernels::LomaZones& z,
                            float scale, cudaStream_t stream = nullptr);
// Writes or accumulates (accumulate) dq, dk, dv (bf16; any may be null). Deterministic (no
// atomics); uses scratch for Delta = rowsum(dout · out) [B, H, T].
void loma_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                             const bf16* k, const bf16* v, const bf16* out, const float* lse,
                             int B, int T, int H, int Hkv, int D, const kernels::LomaZones& z,
                             float scale, bool accumulate, cudaStream_t stream = nullptr);

// ---- paged decode attention (kernels/decode_attention.h) ----
// One new query token per sequence over a paged KV cache whose (sequence, KV head) pairs hold
// different numbers of slots; the arrays mean what they mean in kernels::paged_decode_attention:
//   q, out [B, H, D] bf16; k_pool, v_pool [pages, page_size, D] bf16 (rotated keys, values);
//   lengths [B, Hkv] int; page_table [B, Hkv, max_pages] int32; query head g reads KV head
//   g / (H / Hkv) (GQA); channel D-1 is left out of q·k when exclude_ctrl (DMC's control channel).
// Arithmetic is fp32 (online softmax in base 2); out is bf16. probs, when not null, receives the
// attention weights in fp32 (saved statistics are fp32): probs[(b·H + g)·probs_stride + i] for
// i < lengths[b, g / G]; nothing else of probs is written.
// Requirements: D 32, 64 or 128 (aborts otherwise), H % Hkv == 0,
// 1 <= lengths <= max_pages·page_size (a head of length 0, which the cache never produces, gives
// zeros where the CPU reference gives NaN), q/out/k_pool/v_pool 16-byte aligned.
// Long heads are split into chunks of split_slots slots (flash-decoding; 0 chooses from B, Hkv,
// max_pages and the SM count) combined by a second pass; partial results live in scratch slot 10.
// Deterministic: fixed chunks, fixed reduction order.
void paged_decode_attention(bf16* out, float* probs, int probs_stride, const bf16* q,
                            const bf16* k_pool, const bf16* v_pool, const int32_t* page_table,
                            const int* lengths, int max_pages, int page_size, int B, int H,
                            int Hkv, int D, bool exclude_ctrl, float scale,
                            cudaStream_t stream = nullptr, int split_slots = 0);
// Grows the split partials' scratch to what calls of up to B sequences with this split_slots need,
// so that such calls never reallocate it (a captured CUDA graph keeps pointing at it).
void paged_decode_attention_reserve(int B, int H, int D, int max_pages, int page_size,
                                    int split_slots);

// The same attention over a quantized cache, as kernels::paged_decode_attention_quantized reads
// it: head (b, h) holds q_lengths[b, h] slots in quantized pages (pages: uint8, layout.bytes
// each, in the layout of kernels/kv_quant.h, keys per channel or per token; page_table
// [B, Hkv, max_pages]; full, but for per-token keys the last, whose rows past q_lengths are
// never read), then
// r_lengths[b, h] bf16 slots in its residual block residual_block[b, h] of r_k_pool, r_v_pool
// [blocks, residual_slots, D]. Quantized rows are dequantized as they are read, x = zero +
// code·scale in fp32 as the CPU reference rounds it. GQA groups of 4 to 16 with page_size a
// multiple of 16 (and pages 16-byte aligned) run on paged_decode_attention's tensor-core kernel:
// there the dequantized keys and values enter the products rounded to bf16, as the bf16 pool's
// do; otherwise CUDA cores keep them fp32. out, probs and the rest of the arithmetic as above
// (probs index slots in that order). Requirements as above, D 64 or 128 only, key and value
// groups powers of 2, with lengths = q_lengths + r_lengths
// (at most max_pages·page_size + residual_slots), r_k_pool/r_v_pool 16-byte aligned,
// pages 4-byte aligned, layout from kernels::kv_quant_page_layout. Partial results share scratch
// slot 10 with paged_decode_attention: paged_decode_attention_reserve(B, H, D, max_pages +
// ceil(residual_slots / page_size), page_size, split_slots) reserves for both.
void paged_decode_attention_quantized(bf16* out, float* probs, int probs_stride, const bf16* q,
                                      const uint8_t* pages,
                                      const kernels::KvQuantPageLayout& layout,
                                      const int32_t* page_table, const int* q_lengths,
                                      int max_pages, const bf16* r_k_pool, const bf16* r_v_pool,
                                      const int32_t* residual_block, const int* r_lengths,
                                      int residual_slots, int B, int H, int Hkv, int D,
                                      bool exclude_ctrl, float scale,
                                      cudaStream_t stream = nullptr, int split_slots = 0);

// The same attention over a ThinK cache, as kernels::paged_decode_attention_think reads it: head
// (b, h) holds p_lengths[b, h] slots in pruned pages (page p = page_table[(b·Hkv + h)·max_pages +
// i / page_size] holds the `kept` channels of mask p, masks [pages, ceil(D / 8)], of its keys in
// k_pages [pages, page_size, kept] and its whole values in v_pages [pages, page_size, D], bf16),
// then r_lengths[b, h] bf16 slots in its residual block, as above. A pruned key enters q·k with
// zeros at its pruned channels. GQA groups of 4 to 16 with page_size a multiple of 16 run on
// paged_decode_attention's tensor-core kernel (the keys expanded into its bf16 tiles), the
// others on its CUDA-core kernel; out, probs, the rest of the arithmetic and the requirements as
// for paged_decode_attention_quantized, with lengths = p_lengths + r_lengths, v_pages 16-byte
// aligned.
void paged_decode_attention_think(bf16* out, float* probs, int probs_stride, const bf16* q,
                                  const bf16* k_pages, const bf16* v_pages, const uint8_t* masks,
                                  int kept, const int32_t* page_table, const int* p_lengths,
                                  int max_pages, int page_size, const bf16* r_k_pool,
                                  const bf16* r_v_pool, const int32_t* residual_block,
                                  const int* r_lengths, int residual_slots, int B, int H, int Hkv,
                                  int D, bool exclude_ctrl, float scale,
                                  cudaStream_t stream = nullptr, int split_slots = 0);

// ---- ThinK (kernels/think_channels.h) ----
// energy [n·Hkv, D] fp32, row i's KV head h at i·Hkv + h: adds kernels::think_observe_queries of
// its query heads in q [n, H, D] (bf16, rotated), in the same order and rounding.
void think_observe_queries(float* energy, const bf16* q, int n, int H, int Hkv, int D,
                           bool exclude_ctrl, cudaStream_t stream = nullptr);
// Closes n ThinK pages from the lists of kernels/paged_kv_settle.h: entry j whose page id
// p = page_ids[j] is not negative takes the bf16 rows k_rows[rows[j·P + r]], v_rows[rows[j·P + r]]
// (each [D], r < P = page_size) and writes masks[p] (ceil(D / 8) bytes) =
// kernels::think_select_channels(energy + j·D, those keys, kept), k_pages[p] [P, kept] =
// kernels::think_prune_rows of them, v_pages[p] [P, D] = the values, then energy[j·D ..] = 0.
// The same masks and rows as the CPU functions on the same rows and energy (scores in fp64, in the
// same order). D <= 128; kept in [1, D].
void think_prune_pages(bf16* k_pages, bf16* v_pages, uint8_t* masks, float* energy,
                       const int32_t* page_ids, const bf16* k_rows, const bf16* v_rows,
                       const int32_t* rows, int n, int page_size, int D, int kept,
                       cudaStream_t stream = nullptr);

// ---- KV quantization (kernels/kv_quant.h) ----
// Writes n pages: page page_ids[j] of `pages` (layout.bytes each) from the bf16 rows
// k_rows[rows[j·P + r]], v_rows[rows[j·P + r]] (each [D]; r < P = layout.page_size, rows [0, S)
// the salient tier), the same bytes kernels::kv_quantize_page writes from those rows. Gathering
// by row index lets a closing page take its rows straight from a residual block, in any order
// (ZipCache's salient rows first). An entry whose page id is negative writes nothing, so a
// captured step can launch one entry per head and let the device decide which heads close a page
// (kernels/paged_kv_settle.h). pages 4-byte aligned; page_ids, rows device arrays.
void kv_quantize_pages(uint8_t* pages, const kernels::KvQuantPageLayout& layout,
                       const int32_t* page_ids, const bf16* k_rows, const bf16* v_rows,
                       const int32_t* rows, int n, cudaStream_t stream = nullptr);
// Per-token keys (layout.token_keys; kv_quantize_pages takes keys per channel only): writes n
// rows, row page_rows[j] of page page_ids[j] from the bf16 rows k_rows[rows[j]], v_rows[rows[j]]
// (each [D]), the same bytes kernels::kv_quantize_row writes from them, leaving the pages' other
// rows as they are: each slot that settles, into the next row of its head's last page. Entries
// may name rows of one page (a prefill's), never one row twice; a negative page id writes
// nothing, as above. pages 4-byte aligned; page_ids, page_rows, rows device arrays.
void kv_quantize_rows(uint8_t* pages, const kernels::KvQuantPageLayout& layout,
                      const int32_t* page_ids, const int32_t* page_rows, const bf16* k_rows,
                      const bf16* v_rows, const int32_t* rows, int n,
                      cudaStream_t stream = nullptr);

// ---- paged KV cache writes (kernels/paged_kv_write.h): bf16 pools and window, fp32 omegas ----
using PagedKv = kernels::PagedKvLayer<bf16>;
// k, v [n, Hkv, D] pre-RoPE, their rows kv_row_stride elements apart when it is not 0 (the
// decode step's rows of its one Q, K, V product), else packed (Hkv·D); merge, omega [n, Hkv]
// (null: never merge / omega 1); positions [n]. D 32, 64 or 128; k, v, their rows, the pools and
// the window 16-byte aligned.
void paged_kv_append(const PagedKv& cache, const bf16* k, const bf16* v, const float* merge,
                     const float* omega, const int32_t* positions, int n, int Hkv, int D,
                     float theta, bool keep_last_channel, cudaStream_t stream = nullptr,
                     long kv_row_stride = 0);
// The page bookkeeping (kernels/paged_kv_pages.h). changes [n, L·Hkv], counts, row_slots and
// row_spare [n]: device-visible (mapped host memory serves).
void paged_kv_page_changes(const kernels::PagedKvPages& pages, int row0, int n, int tokens,
                           kernels::PageChange* changes, int32_t* counts, int32_t* row_slots,
                           int32_t* row_spare, cudaStream_t stream = nullptr);
void paged_kv_assign_pages(int32_t* page_table, int32_t* held, const int64_t* index,
                           const int32_t* page, int n, int max_pages,
                           cudaStream_t stream = nullptr);
void paged_kv_clear_rows(int32_t* page_table, int32_t* lengths, int32_t* q_lengths,
                         int32_t* window_count, int32_t sink, int L, int R, int Hkv,
                         int max_pages, int row0, int n, cudaStream_t stream = nullptr);
// One sequence (row) of P tokens; uses scratch slot 11 for the slot indices.
void paged_kv_prefill(const PagedKv& cache, int row, const bf16* khat, const bf16* vhat,
                      const bf16* k, const bf16* v, const float* merge, const float* omega, int P,
                      int Hkv, int D, float theta, bool keep_last_channel,
                      cudaStream_t stream = nullptr);
// A chunk of n tokens continuing row `row` at positions start .. start + n − 1: k, v [n, Hkv, D]
// pre-RoPE, merge, omega [n, Hkv] (null as above); khat, vhat [n, Hkv, D] and prefix [n, Hkv] out.
// Uses scratch slot 11 for the slot indices and ring counts.
void paged_kv_extend(const PagedKv& cache, int row, const bf16* k, const bf16* v,
                     const float* merge, const float* omega, int start, int n, int Hkv, int D,
                     float theta, bool keep_last_channel, bf16* khat, bf16* vhat, int* prefix,
                     cudaStream_t stream = nullptr);

// ---- attention of a chunk continuing one sequence's cache (kernels/chunk_attention.h) ----
// q, out [n, H, D], k, v [n, Hkv, D] bf16 (16-byte aligned); page_table [Hkv, max_pages] and
// prefix [n, Hkv] device arrays; mask [n, Hkv] fp32 or null. D 32, 64 or 128, any GQA group.
// One kernel, no scratch.
void chunk_attention(bf16* out, const bf16* q, const bf16* k_pool, const bf16* v_pool,
                     const int32_t* page_table, int max_pages, int page_size, const int* prefix,
                     const bf16* k, const bf16* v, const float* mask, int n, int H, int Hkv, int D,
                     bool exclude_ctrl, float scale, cudaStream_t stream = nullptr);

// ---- closing the pages of a quantized cache (kernels/paged_kv_settle.h); bf16 rows ----
// page_ids [n·Hkv], rows [n·Hkv·page_size] (a slot at a time: page_rows and rows [n·Hkv]);
// merge [n, Hkv] fp32 (null: never merge); positions [n].
void paged_kv_settle_step(int32_t* page_ids, int32_t* page_rows, int32_t* rows,
                          const kernels::KvSettleLayer& layer, const float* merge,
                          const int32_t* positions, int n, int Hkv, cudaStream_t stream = nullptr);
// page_ids [n·Hkv], rows [n·Hkv·page_size]; stage_k, stage_v [n·Hkv·page_size, D]; r_k, r_v the
// layer's residual pool [R·Hkv, residual_slots, D]; layer.r_pos and r_marks set.
void paged_kv_settle_lagged_step(int32_t* page_ids, int32_t* rows, bf16* stage_k, bf16* stage_v,
                                 const kernels::KvSettleLayer& layer, bf16* r_k, bf16* r_v,
                                 const int32_t* positions, int n, int Hkv, int D,
                                 cudaStream_t stream = nullptr);
// page_ids [Hkv·max_closed], rows [Hkv·max_closed·page_size] (a slot at a time: page_ids,
// page_rows and rows [Hkv·max_closed·page_size]); stage_pos, stage_marks [Hkv·stage_stride]
// (read at settle lag > 0 only: may be null at 0).
void paged_kv_settle_prefill(int32_t* page_ids, int32_t* page_rows, int32_t* rows, int max_closed,
                             const kernels::KvSettleLayer& layer, bf16* r_k, bf16* r_v,
                             const bf16* stage_k, const bf16* stage_v, const int32_t* stage_pos,
                             const uint8_t* stage_marks, int stage_stride, int row, int tokens,
                             int Hkv, int D, cudaStream_t stream = nullptr);
// probs [n, H, probs_stride] fp32 as paged_decode_attention_quantized writes them; layer.r_scores
// set.
void paged_kv_settle_scores(const kernels::KvSettleLayer& layer, const float* probs,
                            int probs_stride, int n, int H, int Hkv,
                            cudaStream_t stream = nullptr);

// ---- eviction by attention (kernels/paged_kv_evict.h): H2O and TOVA on the flat cache layer ----
// probs [n, H, probs_stride] fp32 as paged_decode_attention writes them (TOVA permutes them);
// scores [pages, page_size] fp32 (H2O; null for TOVA); positions [n]; cache.slot_pos set.
void paged_kv_evict(const PagedKv& cache, float* scores, float* probs, int probs_stride,
                    const int32_t* positions, int n, int H, int Hkv, int D,
                    const kernels::EvictPolicy& policy, cudaStream_t stream = nullptr);

// ---- LoMA's segment removal (kernels/paged_kv_drop.h) on the flat cache layer ----
void paged_kv_drop_span(const PagedKv& cache, int n, int Hkv, int D, int count, int keep,
                        cudaStream_t stream = nullptr);

// ---- DMS's delayed eviction (kernels/paged_kv_dms_evict.h) on the flat cache layer ----
// marks [pages, page_size] beside slot_pos (set); evict [n, Hkv] / [P, Hkv] fp32 hard decisions;
// positions [n]. The prefill uses scratch slot 14 for merge' and slot 11 (paged_kv_prefill).
void paged_kv_dms_evict(const PagedKv& cache, uint8_t* marks, const float* evict,
                        const int32_t* positions, int n, int Hkv, int D, int window,
                        cudaStream_t stream = nullptr);
void paged_kv_dms_prefill(const PagedKv& cache, uint8_t* marks, int row, const bf16* k,
                          const bf16* v, const float* evict, int P, int Hkv, int D, int window,
                          float theta, cudaStream_t stream = nullptr);

// ---- token choice (kernels/sample.h): fp32 logits [n, V]; the row settings are device arrays ----
void sample_tokens(int32_t* next, float* logprob, int32_t* argmax, const float* logits, int n,
                   int V, const kernels::SampleRows& rows, cudaStream_t stream = nullptr);
// tokens [n] (device) where negative from previous [n] (device), as kernels::take_previous_choices.
void take_previous_choices(int32_t* tokens, const int32_t* previous, int n,
                           cudaStream_t stream = nullptr);

}  // namespace dmc::cuda
