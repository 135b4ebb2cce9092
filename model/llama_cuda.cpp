#include "model/llama_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "absl/strings/str_format.h"
#include "kernels/cuda_check.h"
#include "model/llama_cuda_parallel.h"
#include "model/loma.h"

namespace dmc::model {

// The element-wise helpers of llama_cuda.cu.
namespace cuda_model_detail {
void add(cuda::bf16* out, const cuda::bf16* a, const cuda::bf16* b, size_t n, cudaStream_t stream);
void masked_sum(float* out, const float* losses, const int32_t* targets, int N, cudaStream_t stream);
// *out = sum_i w[i] · x[i] (written, on the device).
void weighted_sum(float* out, const float* x, const float* w, int N, cudaStream_t stream);
// d[i] = value where targets[i] >= 0 and tokens[i] != skip_input, else 0 (token ids are >= 0, so
// skip_input -1 leaves no input out).
void fill_labelled(float* d, const int32_t* targets, const int32_t* tokens, int32_t skip_input,
                   int N, float value, cudaStream_t stream);
// DMS's decision channel q[n, h·G, D-1] of q [N, H, D], for every KV head h: read into x [N, Hkv]
// (fp32), or set from value [N, Hkv] (null: zeroed).
void get_dms_query_channel(float* x, const cuda::bf16* q, long N, int H, int Hkv, int D,
                           cudaStream_t stream, long row_stride = 0);
void set_dms_query_channel(cuda::bf16* q, const float* value, long N, int H, int Hkv, int D,
                           cudaStream_t stream, long row_stride = 0);
void scale(float* x, size_t n, float s, cudaStream_t stream);
void to_bf16(cuda::bf16* out, const float* in, size_t n, cudaStream_t stream);
}  // namespace cuda_model_detail

namespace {
namespace c = dmc::cuda;
namespace h = cuda_model_detail;
using c::bf16;

parallel::LocalCommunicator& SingleProcess() {
  static parallel::LocalCommunicator local;
  return local;
}

template <typename X>
void Zero(X* p, size_t n, cudaStream_t stream) {
  if (n) DMC_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(X), stream));
}

// RoPE at positions 0..T-1, or at a LoMA layout's position ids (device [T]) when there are any,
// as Rope in model/llama.cpp.
void Rope(bf16* out, const bf16* inp, int B, int T, int H, int D, const int32_t* positions,
          float theta, bool keep_last_channel, cudaStream_t s) {
  if (positions)
    c::rope_forward_positions(out, inp, B, T, H, D, positions, theta, keep_last_channel, s);
  else
    c::rope_forward(out, inp, B, T, H, D, 0, theta, keep_last_channel, s);
}

// Writes dinp (the first writer of the q and k gradients: nothing to add to).
void RopeBackward(bf16* dinp, const bf16* dout, int B, int T, int H, int D,
                  const int32_t* positions, float theta, bool keep_last_channel, cudaStream_t s) {
  if (positions)
    c::rope_backward_positions(dinp, dout, B, T, H, D, positions, theta, keep_last_channel,
                               /*accumulate=*/false, s);
  else
    c::rope_backward(dinp, dout, B, T, H, D, 0, theta, keep_last_channel, /*accumulate=*/false, s);
}

// LoMA's two loss terms from the per-position losses (device [B, T]), computed by the CPU
// model's own LomaZoneLosses on a host copy (B·T floats per step); d(loss)/d(losses[i]) goes to
// weights (device [B·T]) for Backward.
LomaLosses LomaStepLosses(const float* losses, const int32_t* targets, int B, int T,
                          const kernels::LomaZones& z, float* weights, cudaStream_t s) {
  const size_t N = static_cast<size_t>(B) * T;
  std::vector<float> host(N);
  DMC_CUDA_CHECK(
      cudaMemcpyAsync(host.data(), losses, sizeof(float) * N, cudaMemcpyDeviceToHost, s));
  DMC_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<double> dloss;
  const LomaLosses zones = LomaZoneLosses(host.data(), targets, B, T, z, &dloss);
  host.assign(dloss.begin(), dloss.end());
  DMC_CUDA_CHECK(
      cudaMemcpyAsync(weights, host.data(), sizeof(float) * N, cudaMemcpyHostToDevice, s));
  DMC_CUDA_CHECK(cudaStreamSynchronize(s));  // host is freed on return
  return zones;
}

}  // namespace

// Device buffers of one (B, T): the activations Backward needs, per layer, and the work buffers.
struct LlamaCuda::Buffers {
  struct Layer {
    bf16 *x, *xn, *q, *k, *v, *khat, *vhat, *qr, *kr, *att, *x2, *xn2, *gate_up, *h;
    float *rstd, *lse, *rstd2;
    float *noise, *logit, *alpha, *merge, *mask, *omega, *denom;  // DMC, [B, T, Hkv]
    // DMS: the decision input [B, T, Hkv] (merge holds the evictions); the adapter's norm output
    // [N, C] and statistics [N] (null for the query-channel variant)
    float* dms_x;
    bf16* dms_xn;
    float* dms_rstd;
  };
  int B = 0, T = 0;
  std::vector<void*> owned;
  std::vector<Layer> layers;
  int32_t *tokens = nullptr, *targets = nullptr;
  bf16 *x_final, *xn_final, *logits;  // logits [N, vocab_rows_]
  bf16* tmp = nullptr;  // TP > 1: a row-parallel projection's output, all-reduced before its add
  // Vocabulary-parallel cross-entropy: this rank's per-row statistics [2, N], every rank's
  // [tp, 2, N], and the global logsumexp [N] the backward reads.
  float *ce_stats, *ce_all_stats, *ce_lse;
  float *rstd_final, *losses;
  // DMS distillation: the teacher's logits [N, vocab_rows_] and global logsumexps [N], the
  // per-position loss weights [N] and KL(student || teacher) per position [N] (all-reduced).
  bf16* teacher_logits = nullptr;
  float *teacher_lse = nullptr, *distill_weight = nullptr, *distill_kl = nullptr;
  // [kStatsHeader + B + L·B]: the header (labelled loss sum, CR loss, distillation loss),
  // mean_merge[B], per-layer merge fraction [L][B]; one buffer so Forward reads its results back
  // in one copy, into stats_host (pinned), after which stats_ready is recorded.
  enum { kLmLossSum, kCrLoss, kDistillLoss, kStatsHeader };
  float* stats = nullptr;
  float* stats_host = nullptr;
  cudaEvent_t stats_ready = nullptr;
  // LoMA steps: the layout's position ids [T] and d(loss)/d(losses[i]) [B·T] of the last Forward.
  int32_t* positions = nullptr;
  float* loma_dlosses = nullptr;
  // Backward work buffers, reused by every layer.
  bf16 *dlogits, *dres, *dxn, *dh, *dgate_up, *datt, *dqr, *dkr, *dq, *dkhat, *dk, *dvhat, *dv;
  float *dlosses, *dalpha, *domega, *dmerge, *dmask, *dmean_merge;
  float* ddec;  // DMS: the decision input's gradient [B, T, Hkv] (fp32, and its bf16 copy)
  bf16* ddec_bf16;

  template <typename X>
  X* Alloc(size_t n) {
    void* p = nullptr;
    DMC_CUDA_CHECK(cudaMalloc(&p, sizeof(X) * (n ? n : 1)));
    owned.push_back(p);
    return static_cast<X*>(p);
  }
  ~Buffers() {
    for (void* p : owned) DMC_CUDA_CHECK(cudaFree(p));
    if (stats_host) DMC_CUDA_CHECK(cudaFreeHost(stats_host));
    if (stats_ready) DMC_CUDA_CHECK(cudaEventDestroy(stats_ready));
  }
};

LlamaCuda::LlamaCuda(const LlamaConfig& config, parallel::Communicator* tp_comm,
                     parallel::Communicator* zero1_dp)
    : config_(config),
      tp_(tp_comm ? tp_comm : &SingleProcess()),
      zero1_dp_(zero1_dp && zero1_dp->size() > 1 ? zero1_dp : nullptr) {
  if (absl::Status s = config_.Validate(); !s.ok()) throw std::invalid_argument(s.ToString());
  if (!c::device_available())
    throw std::runtime_error("the CUDA model needs a CUDA device, and none is usable");
  head_dim_ = config_.head_dim();
  if (head_dim_ != 64 && head_dim_ != 128)
    throw std::invalid_argument(absl::StrFormat(
        "the CUDA model needs head_dim 64 or 128 (the fused DMC attention kernel's sizes); this "
        "model has hidden_size %d / num_attention_heads %d = %d",
        config_.hidden_size, config_.num_attention_heads, head_dim_));
  // This rank's share, as model/llama.cpp (whose constructor below checks that tp divides them).
  heads_ = config_.num_attention_heads / tp_->size();
  kv_heads_ = config_.num_key_value_heads / tp_->size();
  ffn_ = config_.intermediate_size / tp_->size();

  // The host model defines the parameter layout (names, offsets, decay, TP shards): read it from
  // a temporary one of the same config and TP group, so the two can never disagree.
  {
    const Llama<float> layout(config_, tp_);
    specs_ = layout.param_specs();
    vocab_begin_ = layout.vocab_begin();
    vocab_rows_ = layout.vocab_rows();
    layer_offsets_ = layout.layer_offsets();
  }
  auto offset_of = [&](const std::string& name) {
    for (const auto& s : specs_)
      if (s.name == name) return s.offset;
    throw std::logic_error("no parameter " + name);
  };
  embed_offset_ = offset_of("model.embed_tokens.weight");
  final_norm_offset_ = offset_of("model.norm.weight");
  lm_head_offset_ = config_.tie_word_embeddings ? embed_offset_ : offset_of("lm_head.weight");
  if (config_.dms.variant == DmsVariant::kAdapter)
    for (int l = 0; l < config_.num_hidden_layers; ++l) {
      const std::string p = absl::StrFormat("model.layers.%d.self_attn.", l);
      dms_offsets_.push_back(offset_of(p + "dms_proj_alpha_norm.weight"));
      dms_offsets_.push_back(offset_of(p + "dms_proj_alpha.weight"));
    }
  for (const auto& s : specs_) {
    num_params_ = std::max(num_params_, s.offset + s.size);
    if (s.frozen) frozen_end_ = std::max(frozen_end_, s.offset + s.size);
  }
  for (const auto& s : specs_)
    if (!s.frozen && s.offset < frozen_end_)
      throw std::logic_error("trained tensor " + s.name + " lies among the frozen ones");

  const size_t P = num_params_;
  moment_shard_ = zero1_dp_ ? Zero1Shard::Make(P, zero1_dp_->rank(), zero1_dp_->size())
                            : Zero1Shard::Make(P, 0, 1);
  const size_t M = moment_shard_.slice.size;
  DMC_CUDA_CHECK(cudaMalloc(&master_, P * sizeof(float)));
  DMC_CUDA_CHECK(cudaMalloc(&weights_, P * sizeof(bf16)));
  DMC_CUDA_CHECK(cudaMalloc(&grads_, P * sizeof(float)));
  DMC_CUDA_CHECK(cudaMalloc(&adam_m_, std::max<size_t>(M, 1) * sizeof(float)));
  DMC_CUDA_CHECK(cudaMalloc(&adam_v_, std::max<size_t>(M, 1) * sizeof(float)));
  Zero(master_, P, stream_);
  Zero(weights_, P, stream_);
  Zero(grads_, P, stream_);
  Zero(adam_m_, M, stream_);
  Zero(adam_v_, M, stream_);
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  tp_reduce_ = std::make_unique<DeviceReducer>(*tp_, stream_);
}

LlamaCuda::~LlamaCuda() {
  buf_.reset();
  for (void* p : {static_cast<void*>(master_), static_cast<void*>(weights_),
                  static_cast<void*>(teacher_weights_), static_cast<void*>(grads_),
                  static_cast<void*>(adam_m_), static_cast<void*>(adam_v_)})
    if (p) DMC_CUDA_CHECK(cudaFree(p));
}

const bf16* LlamaCuda::W(size_t offset) const { return weights_ + offset; }
float* LlamaCuda::G(size_t offset) const { return offset < frozen_end_ ? nullptr : grads_ + offset; }

// ---- parameters and optimizer state ----

void LlamaCuda::CopyParamsFromHost(const std::vector<float>& params) {
  if (params.size() != num_params_)
    throw std::invalid_argument(absl::StrFormat("CopyParamsFromHost: %d values, the model has %d",
                                                params.size(), num_params_));
  Transfer(master_, params.data(), num_params_, cudaMemcpyHostToDevice);
  h::to_bf16(weights_, master_, num_params_, stream_);
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void LlamaCuda::CopyParamsFromHost(const Llama<float>& host) {
  const auto& hs = host.param_specs();
  if (hs.size() != specs_.size())
    throw std::invalid_argument("CopyParamsFromHost: the host model has another parameter layout");
  for (size_t i = 0; i < hs.size(); ++i)
    if (hs[i].name != specs_[i].name || hs[i].offset != specs_[i].offset ||
        hs[i].size != specs_[i].size)
      throw std::invalid_argument("CopyParamsFromHost: host parameter " + hs[i].name +
                                  " differs from the device layout");
  CopyParamsFromHost(host.params());
}

void LlamaCuda::SetTeacher(const Llama<float>& teacher) {
  const auto& ts = teacher.param_specs();
  if (ts.size() > specs_.size())
    throw std::invalid_argument("SetTeacher: the teacher has more tensors than the student");
  for (size_t i = 0; i < ts.size(); ++i)
    if (ts[i].name != specs_[i].name || ts[i].offset != specs_[i].offset ||
        ts[i].size != specs_[i].size)
      throw std::invalid_argument("SetTeacher: the teacher's parameter " + ts[i].name +
                                  " differs from the student's layout");
  const size_t n = teacher.params().size();
  if (teacher_weights_) DMC_CUDA_CHECK(cudaFree(teacher_weights_));
  DMC_CUDA_CHECK(cudaMalloc(&teacher_weights_, n * sizeof(bf16)));
  // Rounded on the device, as the student's own bf16 copy is.
  float* staging = nullptr;
  DMC_CUDA_CHECK(cudaMalloc(&staging, n * sizeof(float)));
  Transfer(staging, teacher.params().data(), n, cudaMemcpyHostToDevice);
  h::to_bf16(teacher_weights_, staging, n, stream_);
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  DMC_CUDA_CHECK(cudaFree(staging));
}

void LlamaCuda::Transfer(float* dst, const float* src, size_t n, cudaMemcpyKind kind) const {
  DMC_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), kind, stream_));
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::vector<float> LlamaCuda::ParamsToHost() const {
  std::vector<float> out(num_params_);
  Transfer(out.data(), master_, num_params_, cudaMemcpyDeviceToHost);
  return out;
}

void LlamaCuda::CopyParamsToHost(Llama<float>* host) const {
  if (host->params().size() != num_params_ || host->param_specs().size() != specs_.size())
    throw std::invalid_argument("CopyParamsToHost: the host model has another parameter layout");
  Transfer(host->params().data(), master_, num_params_, cudaMemcpyDeviceToHost);
}

std::vector<float> LlamaCuda::GradsToHost() const {
  std::vector<float> out(num_params_, 0.0f);
  if (!zero_grad_pending_) Transfer(out.data(), grads_, num_params_, cudaMemcpyDeviceToHost);
  return out;
}

void LlamaCuda::GradsFromHost(const std::vector<float>& grads) {
  if (grads.size() != num_params_) throw std::invalid_argument("GradsFromHost: wrong size");
  Transfer(grads_, grads.data(), num_params_, cudaMemcpyHostToDevice);
  zero_grad_pending_ = false;
  frozen_grads_zero_ = false;
}

void LlamaCuda::OptimizerStateToHost(std::vector<float>* m, std::vector<float>* v) const {
  const size_t M = moment_shard_.slice.size;
  m->resize(M);
  v->resize(M);
  Transfer(m->data(), adam_m_, M, cudaMemcpyDeviceToHost);
  Transfer(v->data(), adam_v_, M, cudaMemcpyDeviceToHost);
}

void LlamaCuda::OptimizerStateFromHost(const std::vector<float>& m, const std::vector<float>& v,
                                       int step) {
  const size_t M = moment_shard_.slice.size;
  if (m.size() != M || v.size() != M)
    throw std::invalid_argument(absl::StrFormat(
        "OptimizerStateFromHost: moments of %d and %d values, this rank keeps %d", m.size(),
        v.size(), M));
  Transfer(adam_m_, m.data(), M, cudaMemcpyHostToDevice);
  Transfer(adam_v_, v.data(), M, cudaMemcpyHostToDevice);
  adam_step_ = step;
}

void LlamaCuda::ZeroControlChannelRows() {
  const size_t C = config_.hidden_size, D = head_dim_;
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    const size_t oq = layer_offsets_[l * kLayerTensors + kWq];
    const size_t ok = layer_offsets_[l * kLayerTensors + kWk];
    auto zero_row = [&](size_t base, size_t head) {
      const size_t row = base + (head * D + D - 1) * C;
      Zero(master_ + row, C, stream_);
      Zero(weights_ + row, C, stream_);
    };
    for (int hd = 0; hd < heads_; ++hd) zero_row(oq, hd);
    for (int hd = 0; hd < kv_heads_; ++hd) zero_row(ok, hd);
  }
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void LlamaCuda::ZeroGrad() { zero_grad_pending_ = true; }

void LlamaCuda::FlushZeroGrad() {
  if (!zero_grad_pending_) return;
  Zero(grads_, num_params_, stream_);
  zero_grad_pending_ = false;
  frozen_grads_zero_ = true;
}

void LlamaCuda::SetGradient(size_t offset, float value) {
  if (offset >= num_params_) throw std::invalid_argument("SetGradient: offset past the parameters");
  FlushZeroGrad();
  Transfer(grads_ + offset, &value, 1, cudaMemcpyHostToDevice);
  if (offset < frozen_end_) frozen_grads_zero_ = false;
}

// ---- forward and backward ----

void LlamaCuda::Allocate(int B, int T) {
  if (buf_ && buf_->B == B && buf_->T == T) return;
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  buf_.reset();
  auto b = std::make_unique<Buffers>();
  b->B = B;
  b->T = T;
  const size_t N = static_cast<size_t>(B) * T, C = config_.hidden_size, V = vocab_rows_;
  const size_t D = head_dim_, Q = N * heads_ * D, K = N * kv_heads_ * D, F = N * ffn_;
  const size_t G = N * kv_heads_;
  const int L = config_.num_hidden_layers;
  const bool dms = config_.dms.is_dms(), adapter = !dms_offsets_.empty();
  b->layers.resize(L);
  for (auto& a : b->layers) {
    a.x = b->Alloc<bf16>(N * C);
    a.xn = b->Alloc<bf16>(N * C);
    a.q = b->Alloc<bf16>(Q);
    a.k = b->Alloc<bf16>(K);
    a.v = b->Alloc<bf16>(K);
    a.khat = b->Alloc<bf16>(K);
    a.vhat = b->Alloc<bf16>(K);
    a.qr = b->Alloc<bf16>(Q);
    a.kr = b->Alloc<bf16>(K);
    a.att = b->Alloc<bf16>(Q);
    a.x2 = b->Alloc<bf16>(N * C);
    a.xn2 = b->Alloc<bf16>(N * C);
    a.gate_up = b->Alloc<bf16>(2 * F);  // [N, 2F]: the fused gate/up projection's rows
    a.h = b->Alloc<bf16>(F);
    a.rstd = b->Alloc<float>(N);
    a.lse = b->Alloc<float>(static_cast<size_t>(B) * heads_ * T);
    a.rstd2 = b->Alloc<float>(N);
    for (float** p : {&a.noise, &a.logit, &a.alpha, &a.merge, &a.mask, &a.omega, &a.denom})
      *p = b->Alloc<float>(G);
    a.dms_x = dms ? b->Alloc<float>(G) : nullptr;
    a.dms_xn = adapter ? b->Alloc<bf16>(N * C) : nullptr;
    a.dms_rstd = adapter ? b->Alloc<float>(N) : nullptr;
  }
  b->tokens = b->Alloc<int32_t>(N);
  b->targets = b->Alloc<int32_t>(N);
  b->x_final = b->Alloc<bf16>(N * C);
  b->xn_final = b->Alloc<bf16>(N * C);
  b->logits = b->Alloc<bf16>(N * V);
  b->ce_stats = b->Alloc<float>(2 * N);
  b->ce_all_stats = b->Alloc<float>(2 * N * tp_->size());
  b->ce_lse = b->Alloc<float>(N);
  if (tp_->size() > 1) b->tmp = b->Alloc<bf16>(N * C);
  b->rstd_final = b->Alloc<float>(N);
  b->losses = b->Alloc<float>(N);
  if (dms) {
    b->teacher_logits = b->Alloc<bf16>(N * V);
    b->teacher_lse = b->Alloc<float>(N);
    b->distill_weight = b->Alloc<float>(N);
    b->distill_kl = b->Alloc<float>(N);
  }
  const size_t nstats = Buffers::kStatsHeader + B + static_cast<size_t>(L) * B;
  b->stats = b->Alloc<float>(nstats);
  DMC_CUDA_CHECK(cudaMallocHost(&b->stats_host, sizeof(float) * nstats));
  DMC_CUDA_CHECK(cudaEventCreateWithFlags(&b->stats_ready, cudaEventDisableTiming));
  b->positions = b->Alloc<int32_t>(T);
  b->loma_dlosses = b->Alloc<float>(N);
  b->dlogits = b->Alloc<bf16>(N * V);
  b->dres = b->Alloc<bf16>(N * C);
  b->dxn = b->Alloc<bf16>(N * C);
  b->dh = b->Alloc<bf16>(F);
  b->dgate_up = b->Alloc<bf16>(2 * F);
  b->datt = b->Alloc<bf16>(Q);
  b->dqr = b->Alloc<bf16>(Q);
  b->dq = b->Alloc<bf16>(Q);
  b->dkr = b->Alloc<bf16>(K);
  b->dkhat = b->Alloc<bf16>(K);
  b->dk = b->Alloc<bf16>(K);
  b->dvhat = b->Alloc<bf16>(K);
  b->dv = b->Alloc<bf16>(K);
  b->dlosses = b->Alloc<float>(N);
  // dalpha, domega, dmerge, dmask in one allocation, in this order: one memset per layer.
  b->dalpha = b->Alloc<float>(4 * G);
  b->domega = b->dalpha + G;
  b->dmerge = b->dalpha + 2 * G;
  b->dmask = b->dalpha + 3 * G;
  b->dmean_merge = b->Alloc<float>(B);
  b->ddec = dms ? b->Alloc<float>(G) : nullptr;
  b->ddec_bf16 = adapter ? b->Alloc<bf16>(G) : nullptr;
  buf_ = std::move(b);
}

void LlamaCuda::ForwardAsync(const int32_t* tokens, const int32_t* targets, int B, int T_,
                             const StepOptions& options) {
  if (B <= 0 || T_ <= 0)
    throw std::invalid_argument(absl::StrFormat("batch %d × %d tokens: both must be > 0", B, T_));
  const bool loma = options.loma.enabled();
  if (loma) {
    if (absl::Status st = CheckLomaStep(options.loma, T_, config_); !st.ok())
      throw std::invalid_argument(st.ToString());
  } else if (T_ > config_.max_position_embeddings) {
    throw std::invalid_argument(absl::StrFormat(
        "sequence length %d exceeds max_position_embeddings %d", T_, config_.max_position_embeddings));
  }
  const int V = config_.vocab_size;
  for (long i = 0; i < static_cast<long>(B) * T_; ++i) {
    // The kernels index the embedding and the logits with these: refuse bad ids on the host.
    if (tokens[i] < 0 || tokens[i] >= V)
      throw std::invalid_argument(absl::StrFormat("token %d at %d is outside the vocabulary [0, %d)",
                                                  tokens[i], i, V));
    if (targets[i] >= V)
      throw std::invalid_argument(absl::StrFormat("target %d at %d is outside the vocabulary [0, %d)",
                                                  targets[i], i, V));
  }
  Allocate(B, T_);
  Buffers& b = *buf_;
  batch_ = B;
  seq_ = T_;
  options_ = options;
  forward_dmc_ = config_.dmc.enabled;
  forward_dms_ = config_.dms.enabled;
  distilling_ = forward_dms_ && distillation_;
  const int N = B * T_, L = config_.num_hidden_layers;
  cudaStream_t s = stream_;

  label_count_ = 0;
  double distilled = 0;  // model/DMS.md §4: labelled positions whose input is not EOS
  for (int i = 0; i < N; ++i) {
    if (targets[i] >= 0) label_count_ += 1;
    if (targets[i] >= 0 && tokens[i] != config_.eos_token_id) distilled += 1;
  }
  DMC_CUDA_CHECK(cudaMemcpyAsync(b.tokens, tokens, sizeof(int32_t) * N, cudaMemcpyHostToDevice, s));
  DMC_CUDA_CHECK(cudaMemcpyAsync(b.targets, targets, sizeof(int32_t) * N, cudaMemcpyHostToDevice, s));
  // Lives until LomaStepLosses waits for the stream at the end of ForwardAsync, so the
  // asynchronous upload may read it.
  const std::vector<int32_t> loma_positions =
      loma ? LomaPositions(options.loma, T_) : std::vector<int32_t>();
  if (loma)
    DMC_CUDA_CHECK(cudaMemcpyAsync(b.positions, loma_positions.data(), sizeof(int32_t) * T_,
                                   cudaMemcpyHostToDevice, s));
  const int32_t* positions = loma ? b.positions : nullptr;
  const size_t nstats = Buffers::kStatsHeader + B + static_cast<size_t>(L) * B;
  Zero(b.stats, nstats, s);
  float* mean_merge = b.stats + Buffers::kStatsHeader;

  if (distilling_) {
    // The teacher first (CpuBackend::Forward's order), without the CR loss; of its pass only the
    // logits and logsumexps are kept, the student's overwrites the rest.
    StepOptions plain = options;
    plain.cr_prior = 0;
    ForwardLogits(teacher_weights_ ? teacher_weights_ : weights_, false, false, plain, positions,
                  b.teacher_logits, b.teacher_lse);
  }
  ForwardLogits(weights_, forward_dmc_, forward_dms_, options, positions, b.logits, b.ce_lse);
  h::masked_sum(b.stats + Buffers::kLmLossSum, b.losses, b.targets, N, s);
  if (distilling_) {
    h::fill_labelled(b.distill_weight, b.targets, b.tokens, config_.eos_token_id, N,
                     distilled > 0 ? static_cast<float>(1.0 / distilled) : 0.0f, s);
    c::kl_distill_shard(b.distill_kl, b.logits, b.teacher_logits, b.ce_lse, b.teacher_lse,
                        b.distill_weight, N, vocab_rows_, s);
    TpAllReduce(b.distill_kl, size_t(N));  // each rank summed its vocabulary rows' terms
    h::weighted_sum(b.stats + Buffers::kDistillLoss, b.distill_kl, b.distill_weight, N, s);
  }
  // Each TP rank summed its own heads; the hinge needs all heads of a sequence (as llama.cpp).
  if (forward_dmc_ || forward_dms_) {
    TpAllReduce(mean_merge, nstats - Buffers::kStatsHeader);  // and the per-layer fractions
    if (options.cr_prior > 0)
      c::cr_loss_forward(b.stats + Buffers::kCrLoss, mean_merge, B, options.cr_prior, s);
  }

  DMC_CUDA_CHECK(cudaMemcpyAsync(b.stats_host, b.stats, sizeof(float) * nstats,
                                 cudaMemcpyDeviceToHost, s));
  DMC_CUDA_CHECK(cudaEventRecord(b.stats_ready, s));
  // LoMA's zone losses, and the per-token loss weights Backward reads, are formed on the host from
  // the per-token losses: a LoMA step waits here.
  if (loma)
    loma_losses_ = LomaStepLosses(b.losses, targets, B, T_, options.loma, b.loma_dlosses, s);
}

void LlamaCuda::ForwardLogits(const bf16* weights, bool dmc, bool dms, const StepOptions& options,
                              const int32_t* positions, bf16* logits, float* lse) {
  Buffers& b = *buf_;
  const int B = b.B, T_ = b.T;
  const int N = B * T_, C = config_.hidden_size, D = head_dim_;
  const int H = heads_, Hkv = kv_heads_, F = ffn_, L = config_.num_hidden_layers;
  const bool qchannel = dms && config_.dms.variant == DmsVariant::kQueryChannel;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float fade = options.control_fade;
  const kernels::DmcGateParams gate_params = DmcGates(options.mode);
  const kernels::DmsGateParams dms_params = DmsGates(options.mode);
  const float eps = config_.rms_norm_eps;
  cudaStream_t s = stream_;
  auto w = [weights](size_t offset) { return weights + offset; };
  float* mean_merge = b.stats + Buffers::kStatsHeader;
  float* layer_merge = mean_merge + B;
  // 1 / (L · T · Hkv of the whole model): each sequence's mean merge (eviction) fraction.
  const float merge_scale =
      static_cast<float>(1.0 / (double(L) * T_ * config_.num_key_value_heads));

  // out = residual + inp [N, IC] · W^T, a row-parallel projection (o_proj, down_proj) onto the
  // residual stream. On one rank the GEMM adds the residual in its epilogue; under TP each rank's
  // product is a partial sum, all-reduced before the add, which is then a kernel of its own.
  auto project_onto = [&](bf16* out, const bf16* residual, const bf16* inp, size_t offset,
                          int IC) {
    if (tp_->size() == 1) {
      c::matmul_forward_residual(out, inp, w(offset), residual, N, IC, C, s);
      return;
    }
    c::matmul_forward(b.tmp, inp, w(offset), N, IC, C, s);
    TpAllReduce(b.tmp, size_t(N) * C);
    h::add(out, residual, b.tmp, size_t(N) * C, s);
  };

  c::embedding_forward(b.layers[0].x, b.tokens, w(embed_offset_), N, C, vocab_begin_, vocab_rows_,
                       s);
  TpAllReduce(b.layers[0].x, size_t(N) * C);  // vocabulary-parallel: each rank filled its tokens' rows
  for (int l = 0; l < L; ++l) {
    Buffers::Layer& a = b.layers[l];
    const size_t* o = &layer_offsets_[l * kLayerTensors];
    bf16* x_out = l + 1 < L ? b.layers[l + 1].x : b.x_final;
    c::rmsnorm_forward(a.xn, a.rstd, a.x, w(o[kAttnNorm]), N, C, eps, s);
    c::matmul_forward(a.q, a.xn, w(o[kWq]), N, C, H * D, s);
    c::matmul_forward(a.k, a.xn, w(o[kWk]), N, C, Hkv * D, s);
    c::matmul_forward(a.v, a.xn, w(o[kWv]), N, C, Hkv * D, s);
    if (fade != 1.0f) {
      c::scale_last_channel(a.q, long(N) * H, D, fade, s);
      c::scale_last_channel(a.k, long(N) * Hkv, D, fade, s);
    }
    const bf16* keys = a.k;
    const bf16* values = a.v;
    // Hard decisions read no noise (the CPU model's is 0 there), so it is left unwritten.
    if ((dmc || dms) && options.mode == kernels::DmcDecisionMode::kRelaxed)
      c::logistic_noise(a.noise, B, T_, Hkv, options.noise_seed,
                        (options.step << 16) | static_cast<uint64_t>(l), options.seq0,
                        tp_->rank() * Hkv, config_.num_key_value_heads, s);
    if (dmc) {
      c::dmc_gates_forward({a.logit, a.alpha, a.merge, a.mask, a.omega}, a.q, a.k, a.noise, B, T_,
                           H, Hkv, D, gate_params, s);
      c::dmc_scan_forward_kv(a.khat, a.vhat, a.denom, a.k, a.v, a.alpha, a.omega, B, T_, Hkv, D,
                             config_.dmc.window, s);
      keys = a.khat;
      values = a.vhat;
    }
    if (dms) {
      // The decision input (Llama::DmsDecisionInput): the adapter on the residual input, or the
      // query channel, which is then zeroed for attention (before RoPE here, after it below).
      if (qchannel) {
        h::get_dms_query_channel(a.dms_x, a.q, N, H, Hkv, D, s);
        h::set_dms_query_channel(a.q, nullptr, N, H, Hkv, D, s);
      } else {
        c::rmsnorm_forward(a.dms_xn, a.dms_rstd, a.x, w(dms_offsets_[2 * l]), N, C, eps, s);
        c::matmul_forward_f32(a.dms_x, a.dms_xn, w(dms_offsets_[2 * l + 1]), N, C, Hkv, s);
      }
      c::dms_gates_forward(a.logit, a.alpha, a.merge, a.mask, a.dms_x, a.noise, B, T_, Hkv,
                           dms_params, s);
    }
    if (dmc || dms) {
      c::cr_accumulate_merge(mean_merge, a.merge, B, T_, Hkv, merge_scale, s);
      // Per-layer statistics: f[l, b] = mean over positions and heads of merge.
      c::cr_accumulate_merge(layer_merge + static_cast<size_t>(l) * B, a.merge, B, T_, Hkv,
                             static_cast<float>(1.0 / (double(T_) * config_.num_key_value_heads)),
                             s);
    }
    Rope(a.qr, a.q, B, T_, H, D, positions, config_.rope_theta, dmc, s);
    Rope(a.kr, keys, B, T_, Hkv, D, positions, config_.rope_theta, dmc, s);
    if (qchannel) h::set_dms_query_channel(a.qr, nullptr, N, H, Hkv, D, s);
    if (fade != 1.0f) {
      c::scale_last_channel(a.qr, long(N) * H, D, fade, s);
      c::scale_last_channel(a.kr, long(N) * Hkv, D, fade, s);
    }
    if (options.loma.enabled())
      c::loma_attention_forward(a.att, a.lse, a.qr, a.kr, values, B, T_, H, Hkv, D, options.loma,
                                scale, s);
    else
      c::dmc_attention_forward(a.att, a.lse, a.qr, a.kr, values, dmc || dms ? a.mask : nullptr, B,
                               T_, H, Hkv, D, dmc, scale, s, dms ? config_.dms.window : 0);
    project_onto(a.x2, a.x, a.att, o[kWo], H * D);

    // MLP half (Llama::MlpForward).
    c::rmsnorm_forward(a.xn2, a.rstd2, a.x2, w(o[kMlpNorm]), N, C, eps, s);
    // gate and up as one GEMM: their weights are adjacent rows [2F, C] (model::LayerTensor).
    c::matmul_forward(a.gate_up, a.xn2, w(o[kGate]), N, C, 2 * F, s);
    c::swiglu_forward(a.h, a.gate_up, a.gate_up + F, N, F, 2 * F, s);
    project_onto(x_out, a.x2, a.h, o[kDown], F);
  }
  c::rmsnorm_forward(b.xn_final, b.rstd_final, b.x_final, w(final_norm_offset_), N, C, eps, s);
  // Vocabulary-parallel LM head and cross-entropy (as llama.cpp): the ranks exchange 2·N
  // statistics, not the logits.
  c::matmul_forward(logits, b.xn_final, w(lm_head_offset_), N, C, vocab_rows_, s);
  c::cross_entropy_shard_stats(b.ce_stats, logits, b.targets, N, vocab_rows_, vocab_begin_, s);
  const float* all_stats = b.ce_stats;
  if (tp_->size() > 1) {
    TpAllGather(b.ce_stats, b.ce_all_stats, 2 * size_t(N));
    all_stats = b.ce_all_stats;
  }
  c::cross_entropy_combine_shards(b.losses, lse, all_stats, b.targets, N, tp_->size(), s);
}

ForwardResult LlamaCuda::Forward(const int32_t* tokens, const int32_t* targets, int B, int T_,
                                 const StepOptions& options) {
  ForwardAsync(tokens, targets, B, T_, options);
  return ForwardResults();
}

ForwardResult LlamaCuda::ForwardResults() {
  if (!buf_ || batch_ == 0) throw std::logic_error("LlamaCuda::ForwardResults without a Forward");
  const Buffers& b = *buf_;
  const int B = batch_, L = config_.num_hidden_layers;
  const StepOptions& options = options_;
  TpSynchronize();
  DMC_CUDA_CHECK(cudaEventSynchronize(b.stats_ready));
  const float* stats = b.stats_host;
  const float* mean_merge = stats + Buffers::kStatsHeader;

  ForwardResult result;
  result.lm_loss = label_count_ > 0 ? stats[Buffers::kLmLossSum] / label_count_ : 0.0;
  if (distilling_) result.distill_loss = stats[Buffers::kDistillLoss];
  if (forward_dmc_ || forward_dms_) {
    if (options.cr_prior > 0) result.cr_loss = stats[Buffers::kCrLoss];
    double total = 0;
    for (int i = 0; i < B; ++i) total += mean_merge[i];
    result.merge_fraction = total / B;
    result.layer_merge_fraction.assign(L, 0.0);
    for (int l = 0; l < L; ++l) {
      double sum = 0;
      for (int i = 0; i < B; ++i) sum += mean_merge[B + static_cast<size_t>(l) * B + i];
      result.layer_merge_fraction[l] = sum / B;
    }
  }
  if (options.loma.enabled()) {
    result.lm_loss = loma_losses_.reading;
    result.rep_loss = loma_losses_.repetition;
  }
  result.loss = (distilling_ ? result.distill_loss : result.lm_loss) + result.cr_loss +
                result.rep_loss;
  return result;
}

void LlamaCuda::Backward(double loss_scale, parallel::Communicator* average_over) {
  if (!buf_ || batch_ == 0) throw std::logic_error("LlamaCuda::Backward without a Forward");
  // Checked here, not in the forward, which runs any window (evaluation needs no gradients).
  if (forward_dmc_ && !c::dmc_scan_window_fits(seq_, config_.dmc.window))
    throw std::invalid_argument(absl::StrFormat(
        "DMC window %d over sequences of %d tokens is too long for the CUDA scan's backward on "
        "this GPU (it holds a window's gates on both sides of a tile in shared memory): train "
        "with a window of at most %d",
        config_.dmc.window, seq_, c::dmc_scan_max_window()));
  // Only the trained tensors are averaged: a frozen one has no gradient. They follow the frozen
  // ones, so the buckets cover [frozen_end_, num_params_), and a layer's tensors are reported
  // done only when they lie there (an adapter model's adapters come last in the layout but are
  // finished layer by layer: its buckets all start at Finish).
  GradientBuckets buckets(DpReducer(average_over), grads_ + frozen_end_, num_params_ - frozen_end_,
                          dp_bucket_floats_);
  auto ready = [&](size_t offset) {
    if (offset >= frozen_end_ && dms_offsets_.empty()) buckets.Ready(offset - frozen_end_);
  };
  Buffers& b = *buf_;
  const int B = batch_, T_ = seq_;
  const int N = B * T_, C = config_.hidden_size, V = vocab_rows_, D = head_dim_;
  const int H = heads_, Hkv = kv_heads_, F = ffn_, L = config_.num_hidden_layers;
  const bool dmc = forward_dmc_, dms = forward_dms_;
  const bool qchannel = dms && config_.dms.variant == DmsVariant::kQueryChannel;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float fade = options_.control_fade;
  const kernels::DmcGateParams gate_params = DmcGates(options_.mode);
  const kernels::DmsGateParams dms_params = DmsGates(options_.mode);
  cudaStream_t s = stream_;
  const size_t NG = size_t(N) * Hkv;
  float* mean_merge = b.stats + Buffers::kStatsHeader;
  const float merge_scale =
      static_cast<float>(1.0 / (double(L) * T_ * config_.num_key_value_heads));
  const bool loma = options_.loma.enabled();
  const int32_t* positions = loma ? b.positions : nullptr;

  // Each trained parameter's gradient is written (the first Backward after ZeroGrad: accumulate
  // false, so the step needs no memset of all of them) or added into by one call below: the
  // linear_dweight and norm_backward helpers, the embedding's scatter excepted. What none of
  // them writes is zeroed here: the tensors of UnwrittenGradients, and the frozen ones (no
  // gradient is formed for them) when something other than Backward wrote there since they were
  // last zeroed.
  const bool add = !zero_grad_pending_;
  if (zero_grad_pending_) {
    if (!frozen_grads_zero_) Zero(grads_, frozen_end_, s);
    for (const ParamSpec& spec : UnwrittenGradients(specs_, config_, dms))
      if (float* g = G(spec.offset)) Zero(g, spec.size, s);
    zero_grad_pending_ = false;
    frozen_grads_zero_ = true;
  }
  auto linear_dweight = [&](size_t offset, const bf16* dout, const bf16* inp, int IC, int OC) {
    c::matmul_backward(nullptr, G(offset), dout, inp, W(offset), N, IC, OC, add, s);
  };
  // A norm's backward in one pass over dout and inp: its input's gradient written into dres or
  // added to it (add_dres), its weight's (none when frozen) written or added as above.
  auto norm_backward = [&](size_t offset, const bf16* dout, const bf16* inp, const float* rstd,
                           bool add_dres) {
    c::rmsnorm_backward(b.dres, G(offset), dout, inp, W(offset), rstd, N, C, add_dres, add, s);
  };

  // Loss = mean over labelled positions of the cross-entropy (LoMA: one mean per zone, summed),
  // or, distilling, the weighted KL(student || teacher).
  // Each activation gradient below is written by its first writer (accumulate false) and added
  // into by the later ones (true), so none of them is zeroed first.
  if (distilling_) {
    c::kl_distill_shard_backward(b.dlogits, b.logits, b.teacher_logits, b.ce_lse, b.teacher_lse,
                                 b.distill_kl, b.distill_weight, static_cast<float>(loss_scale),
                                 N, V, /*accumulate=*/false, s);
  } else {
    if (loma) {
      DMC_CUDA_CHECK(cudaMemcpyAsync(b.dlosses, b.loma_dlosses, sizeof(float) * N,
                                     cudaMemcpyDeviceToDevice, s));
      h::scale(b.dlosses, N, static_cast<float>(loss_scale), s);
    } else {
      h::fill_labelled(b.dlosses, b.targets, b.tokens, -1, N,
                       label_count_ > 0 ? static_cast<float>(loss_scale / label_count_) : 0.0f,
                       s);
    }
    c::cross_entropy_shard_backward(b.dlogits, b.logits, b.ce_lse, b.targets, b.dlosses, N, V,
                                    vocab_begin_, /*accumulate=*/false, s);
  }
  c::matmul_backward(b.dxn, nullptr, b.dlogits, b.xn_final, W(lm_head_offset_), N, C, V,
                     /*accumulate=*/false, s);
  // A tied LM head's gradient is the embedding's: written here, before the lookup's scatter.
  linear_dweight(lm_head_offset_, b.dlogits, b.xn_final, C, V);
  TpAllReduce(b.dxn, size_t(N) * C);  // vocabulary-parallel LM head: a share of the sum per rank
  // dres, the residual stream's gradient, is written here; every norm below adds its branch.
  norm_backward(final_norm_offset_, b.dxn, b.x_final, b.rstd_final, /*add_dres=*/false);
  ready(final_norm_offset_);  // the final norm and an untied LM head are done

  // CR loss gradient w.r.t. each sequence's mean merge fraction (read by DMC and DMS layers only;
  // cr_loss_backward adds into it, and without a prior it stays zero).
  if (dmc || dms) {
    Zero(b.dmean_merge, B, s);
    if (options_.cr_prior > 0)
      c::cr_loss_backward(b.dmean_merge, mean_merge, B, options_.cr_prior,
                          static_cast<float>(loss_scale), s);
  }

  for (int l = L - 1; l >= 0; --l) {
    Buffers::Layer& a = b.layers[l];
    const size_t* o = &layer_offsets_[l * kLayerTensors];

    // MLP half: dres flows to x2 unchanged (residual) and through down ∘ swiglu ∘ gate/up ∘ norm.
    c::matmul_backward(b.dh, nullptr, b.dres, a.h, W(o[kDown]), N, F, C, /*accumulate=*/false, s);
    linear_dweight(o[kDown], b.dres, a.h, F, C);
    c::swiglu_backward(b.dgate_up, b.dgate_up + F, b.dh, a.gate_up, a.gate_up + F, N, F, 2 * F,
                       /*accumulate=*/false, s);
    // The input gradient first, summed over TP while the weight gradients run; gate and up as
    // one GEMM each way (their weights, and so their gradients, adjacent rows [2F, C]).
    c::matmul_backward(b.dxn, nullptr, b.dgate_up, a.xn2, W(o[kGate]), N, C, 2 * F,
                       /*accumulate=*/false, s);
    TpStartAllReduce(b.dxn, size_t(N) * C);
    linear_dweight(o[kGate], b.dgate_up, a.xn2, C, 2 * F);
    TpJoin();
    norm_backward(o[kMlpNorm], b.dxn, a.x2, a.rstd2, /*add_dres=*/true);

    // Attention half.
    c::matmul_backward(b.datt, nullptr, b.dres, a.att, W(o[kWo]), N, H * D, C,
                       /*accumulate=*/false, s);
    linear_dweight(o[kWo], b.dres, a.att, H * D, C);
    // dalpha, domega and dmerge (contiguous, then dmask) start at zero: the DMC scan's gate pass
    // and cr_accumulate_merge_backward only add into them (small [B, T, Hkv] buffers). The
    // attention writes dmask, except LoMA's, which has no mask: there it stays zero.
    if (dmc || dms) Zero(b.dalpha, (loma ? 4 : 3) * NG, s);
    const bf16* values = dmc ? a.vhat : a.v;
    if (loma)
      c::loma_attention_backward(b.dqr, b.dkr, b.dvhat, b.datt, a.qr, a.kr, values, a.att, a.lse,
                                 B, T_, H, Hkv, D, options_.loma, scale, /*accumulate=*/false, s);
    else
      c::dmc_attention_backward(b.dqr, b.dkr, b.dvhat, dmc || dms ? b.dmask : nullptr, b.datt,
                                a.qr, a.kr, values, dmc || dms ? a.mask : nullptr, a.att, a.lse, B,
                                T_, H, Hkv, D, dmc, scale, /*accumulate=*/false, s,
                                dms ? config_.dms.window : 0);
    if (qchannel) h::set_dms_query_channel(b.dqr, nullptr, N, H, Hkv, D, s);
    if (fade != 1.0f) {
      c::scale_last_channel(b.dqr, long(N) * H, D, fade, s);
      c::scale_last_channel(b.dkr, long(N) * Hkv, D, fade, s);
    }
    RopeBackward(b.dq, b.dqr, B, T_, H, D, positions, config_.rope_theta, dmc, s);
    RopeBackward(b.dkhat, b.dkr, B, T_, Hkv, D, positions, config_.rope_theta, dmc, s);
    bf16* dk = b.dkhat;
    bf16* dv = b.dvhat;
    if (dmc) {
      // writes dk and dv (no memset first), adds to dalpha and domega
      c::dmc_scan_backward_kv(b.dk, b.dv, b.dalpha, b.domega, b.dkhat, b.dvhat, a.k, a.v, a.khat,
                              a.vhat, a.alpha, a.omega, a.denom, B, T_, Hkv, D, config_.dmc.window,
                              /*accumulate=*/false, s);
      c::cr_accumulate_merge_backward(b.dmerge, b.dmean_merge, B, T_, Hkv, merge_scale, s);
      c::dmc_gates_backward(b.dq, b.dk, b.dalpha, b.dmerge, b.dmask, b.domega, a.q, a.logit,
                            a.alpha, B, T_, H, Hkv, D, gate_params, s);
      dk = b.dk;
      dv = b.dv;
    }
    if (dms) {
      c::cr_accumulate_merge_backward(b.dmerge, b.dmean_merge, B, T_, Hkv, merge_scale, s);
      c::dms_gates_backward(b.ddec, b.dmerge, b.dmask, a.logit, a.alpha, B, T_, Hkv, dms_params,
                            /*accumulate=*/false, s);
      // The channel was zeroed for attention, so the decision is its only use.
      if (qchannel) h::set_dms_query_channel(b.dq, b.ddec, N, H, Hkv, D, s);
    }
    if (fade != 1.0f) {
      c::scale_last_channel(b.dq, long(N) * H, D, fade, s);
      c::scale_last_channel(dk, long(N) * Hkv, D, fade, s);
    }
    c::matmul_backward(b.dxn, nullptr, b.dq, a.xn, W(o[kWq]), N, C, H * D, /*accumulate=*/false,
                       s);
    c::matmul_backward(b.dxn, nullptr, dk, a.xn, W(o[kWk]), N, C, Hkv * D, /*accumulate=*/true, s);
    c::matmul_backward(b.dxn, nullptr, dv, a.xn, W(o[kWv]), N, C, Hkv * D, /*accumulate=*/true, s);
    TpStartAllReduce(b.dxn, size_t(N) * C);
    linear_dweight(o[kWq], b.dq, a.xn, C, H * D);
    linear_dweight(o[kWk], dk, a.xn, C, Hkv * D);
    linear_dweight(o[kWv], dv, a.xn, C, Hkv * D);
    TpJoin();
    norm_backward(o[kAttnNorm], b.dxn, a.x, a.rstd, /*add_dres=*/true);
    if (dms && !dms_offsets_.empty()) {  // the adapter reads the residual through its own norm
      const size_t norm = dms_offsets_[2 * l], proj = dms_offsets_[2 * l + 1];
      h::to_bf16(b.ddec_bf16, b.ddec, NG, s);
      c::matmul_backward(b.dxn, nullptr, b.ddec_bf16, a.dms_xn, W(proj), N, C, Hkv,
                         /*accumulate=*/false, s);
      linear_dweight(proj, b.ddec_bf16, a.dms_xn, C, Hkv);
      TpAllReduce(b.dxn, size_t(N) * C);  // column-parallel over KV heads
      norm_backward(norm, b.dxn, a.x, a.dms_rstd, /*add_dres=*/true);
    }
    ready(o[kAttnNorm]);  // layer l's tensors are done
  }
  // A scatter, which adds: after ZeroGrad, the tied LM head's product above wrote dwte, or the
  // zeroing at the start did.
  if (float* dwte = G(embed_offset_))
    c::embedding_backward(dwte, b.dres, b.tokens, N, C, vocab_begin_, vocab_rows_, s);
  // The embedding (holding a tied LM head's gradient too) is done only now.
  if (absl::Status st = buckets.Finish(); !st.ok())
    throw std::runtime_error("data-parallel gradient all-reduce failed: " + st.ToString());
  TpSynchronize();
  DMC_CUDA_CHECK(cudaGetLastError());
}

std::vector<float> LlamaCuda::LogitsToHost() const {
  if (!buf_) return {};
  const size_t n = static_cast<size_t>(batch_) * seq_ * vocab_rows_;
  std::vector<bf16> raw(n);
  DMC_CUDA_CHECK(cudaMemcpyAsync(raw.data(), buf_->logits, n * sizeof(bf16),
                                 cudaMemcpyDeviceToHost, stream_));
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(raw[i]);
  return out;
}

std::vector<float> LlamaCuda::MergeToHost(int layer) const {
  if (!buf_ || layer < 0 || layer >= config_.num_hidden_layers) return {};
  const size_t n = static_cast<size_t>(batch_) * seq_ * kv_heads_;
  std::vector<float> out(n);
  DMC_CUDA_CHECK(cudaMemcpyAsync(out.data(), buf_->layers[layer].merge, n * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream_));
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return out;
}

}  // namespace dmc::model
