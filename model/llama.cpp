#include "model/llama.h"

#include <cmath>
#include <cstdlib>
#include <stdexcept>

#include "absl/strings/str_format.h"
#include "kernels/control_channel.h"
#include "kernels/cr_loss.h"
#include "kernels/cross_entropy.h"
#include "kernels/dmc_attention.h"
#include "kernels/dmc_scan.h"
#include "kernels/dms_gates.h"
#include "kernels/embedding.h"
#include "kernels/kl_distill.h"
#include "kernels/loma_attention.h"
#include "kernels/matmul.h"
#include "kernels/noise.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/rope_positions.h"
#include "kernels/swiglu.h"
#include "model/loma.h"

namespace dmc::model {
namespace k = dmc::kernels;

namespace {

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

// Standard normal from two counter-based uniforms (Box-Muller).
double HashNormal(uint64_t seed, uint64_t stream, uint64_t index) {
  const double u1 = k::hash_uniform(seed, stream, 2 * index);
  const double u2 = k::hash_uniform(seed, stream, 2 * index + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

parallel::LocalCommunicator& SingleProcess() {
  static parallel::LocalCommunicator local;
  return local;
}

template <typename T>
void Resize(std::vector<T>& v, size_t n) {
  v.assign(n, T(0));
}

// RoPE at positions 0..T-1, or at the given position ids (LoMA's layout) when there are any.
template <typename T>
void Rope(T* out, const T* inp, int B, int T_, int H, int D,
          const std::vector<int32_t>& positions, float theta, bool keep_last_channel) {
  if (positions.empty())
    k::rope_forward(out, inp, B, T_, H, D, 0, theta, keep_last_channel);
  else
    k::rope_forward_positions(out, inp, B, T_, H, D, positions.data(), theta, keep_last_channel);
}

// Writes dinp (the first writer of the q and k gradients: nothing to add to).
template <typename T>
void RopeBackward(T* dinp, const T* dout, int B, int T_, int H, int D,
                  const std::vector<int32_t>& positions, float theta, bool keep_last_channel) {
  if (positions.empty())
    k::rope_backward(dinp, dout, B, T_, H, D, 0, theta, keep_last_channel, /*accumulate=*/false);
  else
    k::rope_backward_positions(dinp, dout, B, T_, H, D, positions.data(), theta,
                               keep_last_channel, /*accumulate=*/false);
}

}  // namespace

template <typename T>
void ZeroDmsQueryChannel(T* q, long N, int H, int Hkv, int D) {
  const int G = H / Hkv;
  for (long n = 0; n < N; ++n)
    for (int h = 0; h < Hkv; ++h) q[(n * H + h * G) * D + D - 1] = T(0);
}
template void ZeroDmsQueryChannel<float>(float*, long, int, int, int);
template void ZeroDmsQueryChannel<double>(double*, long, int, int, int);

TpSlice TpShard(int64_t full, int rank, int ranks) {
  const int64_t base = full / ranks, extra = full % ranks;
  return {rank * base + std::min<int64_t>(rank, extra), base + (rank < extra ? 1 : 0)};
}

template <typename T>
Llama<T>::Llama(const LlamaConfig& config, parallel::Communicator* tp_comm)
    : config_(config), tp_(tp_comm ? tp_comm : &SingleProcess()) {
  if (absl::Status s = config_.Validate(); !s.ok()) throw std::invalid_argument(s.ToString());
  const int tp = tp_->size();
  if (config_.num_key_value_heads % tp != 0 || config_.intermediate_size % tp != 0)
    throw std::invalid_argument(absl::StrFormat(
        "tensor-parallel size %d must divide num_key_value_heads (%d) and intermediate_size (%d)",
        tp, config_.num_key_value_heads, config_.intermediate_size));
  if (config_.vocab_size < tp)
    throw std::invalid_argument(absl::StrFormat(
        "tensor-parallel size %d exceeds vocab_size %d: every rank needs vocabulary rows", tp,
        config_.vocab_size));
  heads_ = config_.num_attention_heads / tp;
  kv_heads_ = config_.num_key_value_heads / tp;
  ffn_ = config_.intermediate_size / tp;
  head_dim_ = config_.head_dim();
  const int64_t C = config_.hidden_size, V = config_.vocab_size, D = head_dim_;
  const int64_t H = config_.num_attention_heads, Hkv = config_.num_key_value_heads;
  const int64_t F = config_.intermediate_size;

  embed_offset_ = AddParam("model.embed_tokens.weight", {V, C}, 0, true);
  vocab_begin_ = static_cast<int>(specs_.back().split_begin);
  vocab_rows_ = static_cast<int>(specs_.back().shape[0]);
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    const std::string p = absl::StrFormat("model.layers.%d.", l);
    layer_offsets_.push_back(AddParam(p + "input_layernorm.weight", {C}, -1, false));
    layer_offsets_.push_back(AddParam(p + "self_attn.q_proj.weight", {H * D, C}, 0, true));
    layer_offsets_.push_back(AddParam(p + "self_attn.k_proj.weight", {Hkv * D, C}, 0, true));
    layer_offsets_.push_back(AddParam(p + "self_attn.v_proj.weight", {Hkv * D, C}, 0, true));
    layer_offsets_.push_back(AddParam(p + "self_attn.o_proj.weight", {C, H * D}, 1, true));
    layer_offsets_.push_back(AddParam(p + "post_attention_layernorm.weight", {C}, -1, false));
    layer_offsets_.push_back(AddParam(p + "mlp.gate_proj.weight", {F, C}, 0, true));
    layer_offsets_.push_back(AddParam(p + "mlp.up_proj.weight", {F, C}, 0, true));
    layer_offsets_.push_back(AddParam(p + "mlp.down_proj.weight", {C, F}, 1, true));
    const size_t* o = &layer_offsets_[size_t(l) * kLayerTensors];
    if (o[kUp] != o[kGate] + size_t(ffn_) * C)  // LayerTensor: one GEMM on the CUDA paths
      throw std::logic_error("gate_proj and up_proj are not adjacent in the parameter layout");
    if (o[kWk] != o[kWq] + size_t(heads_) * D * C || o[kWv] != o[kWk] + size_t(kv_heads_) * D * C)
      throw std::logic_error("q_proj, k_proj and v_proj are not adjacent in the parameter layout");
  }
  final_norm_offset_ = AddParam("model.norm.weight", {C}, -1, false);
  lm_head_offset_ = config_.tie_word_embeddings ? embed_offset_
                                                : AddParam("lm_head.weight", {V, C}, 0, true);
  // The DMS adapter comes after the base tensors, which keep their layout, and alone is trained.
  if (config_.dms.variant == DmsVariant::kAdapter) {
    for (ParamSpec& spec : specs_) spec.frozen = true;
    for (int l = 0; l < config_.num_hidden_layers; ++l) {
      const std::string p = absl::StrFormat("model.layers.%d.self_attn.", l);
      dms_offsets_.push_back(AddParam(p + "dms_proj_alpha_norm.weight", {C}, -1, false));
      dms_offsets_.push_back(AddParam(p + "dms_proj_alpha.weight", {Hkv, C}, 0, false));
    }
  }
  size_t total = 0;
  for (const auto& s : specs_) total = std::max(total, s.offset + s.size);
  params_.assign(total, T(0));
  grads_.assign(total, T(0));
}

template <typename T>
size_t Llama<T>::AddParam(const std::string& name, std::vector<int64_t> full_shape, int split_dim,
                          bool decay) {
  ParamSpec spec;
  spec.name = name;
  spec.full_shape = full_shape;
  spec.shape = full_shape;
  spec.split_dim = split_dim;
  if (split_dim >= 0) {
    const TpSlice slice = TpShard(full_shape[split_dim], tp_->rank(), tp_->size());
    spec.shape[split_dim] = slice.size;
    spec.split_begin = slice.begin;
  }
  spec.size = 1;
  for (int64_t d : spec.shape) spec.size *= d;
  spec.offset = specs_.empty() ? 0 : specs_.back().offset + specs_.back().size;
  spec.weight_decay = decay;
  specs_.push_back(spec);
  return spec.offset;
}

template <typename T>
const ParamSpec* Llama<T>::FindParam(const std::string& name) const {
  for (const auto& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

template <typename T>
void Llama<T>::InitRandom(uint64_t seed) {
  const double out_scale = 1.0 / std::sqrt(2.0 * config_.num_hidden_layers);
  for (const auto& s : specs_) {
    T* w = params_.data() + s.offset;
    if (s.shape.size() == 1) {  // RMSNorm gains
      for (size_t i = 0; i < s.size; ++i) w[i] = T(1);
      continue;
    }
    if (s.name.find("dms_proj_alpha.weight") != std::string::npos) {
      // zero, so every decision logit starts at -offset (model/DMS.md §1: no eviction at first)
      std::fill(w, w + s.size, T(0));
      continue;
    }
    const bool output_proj = s.name.find("o_proj") != std::string::npos ||
                             s.name.find("down_proj") != std::string::npos;
    const double stddev = 0.02 * (output_proj ? out_scale : 1.0);
    const int64_t rows = s.shape[0], cols = s.shape[1], full_cols = s.full_shape[1];
    const int64_t row0 = s.split_dim == 0 ? s.split_begin : 0;
    const int64_t col0 = s.split_dim == 1 ? s.split_begin : 0;
    const uint64_t stream = Fnv1a(s.name);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        w[i * cols + j] = static_cast<T>(
            stddev * HashNormal(seed, stream, static_cast<uint64_t>((row0 + i) * full_cols + col0 + j)));
  }
}

template <typename T>
void Llama<T>::ZeroControlChannelRows() {
  const int C = config_.hidden_size, D = head_dim_;
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    T* wq = params_.data() + layer_offsets_[l * kLayerTensors + kWq];
    T* wk = params_.data() + layer_offsets_[l * kLayerTensors + kWk];
    for (int h = 0; h < heads_; ++h)
      for (int c = 0; c < C; ++c) wq[(static_cast<long>(h) * D + D - 1) * C + c] = T(0);
    for (int h = 0; h < kv_heads_; ++h)
      for (int c = 0; c < C; ++c) wk[(static_cast<long>(h) * D + D - 1) * C + c] = T(0);
  }
}

template <typename T>
typename Llama<T>::LayerWeights Llama<T>::layer(int l) const {
  const T* p = params_.data();
  const size_t* o = &layer_offsets_[l * kLayerTensors];
  const bool adapter = !dms_offsets_.empty();
  return {p + o[kAttnNorm], p + o[kWq], p + o[kWk],      p + o[kWv],  p + o[kWo],
          p + o[kMlpNorm],  p + o[kGate], p + o[kUp], p + o[kDown],
          adapter ? p + dms_offsets_[2 * l] : nullptr,
          adapter ? p + dms_offsets_[2 * l + 1] : nullptr};
}

template <typename T>
void Llama<T>::set_compression_enabled(bool enabled) {
  if (config_.dms.is_dms())
    config_.dms.enabled = enabled;
  else
    config_.dmc.enabled = enabled;
}

template <typename T>
void Llama<T>::SetDistillationTarget(const std::vector<T>& logits, const std::vector<T>& lse) {
  teacher_logits_ = logits;
  teacher_lse_ = lse;
  distill_next_ = true;
}

template <typename T>
void Llama<T>::DmsDecisionInput(int l, const T* x_res, const T* q, T* out, int N, T* rstd,
                                T* xn) const {
  const int C = config_.hidden_size, D = head_dim_, G = heads_ / kv_heads_;
  if (config_.dms.variant == DmsVariant::kAdapter) {
    const LayerWeights w = layer(l);
    k::rmsnorm_forward(xn, rstd, x_res, w.dms_norm, N, C, config_.rms_norm_eps);
    k::matmul_forward(out, xn, w.dms_proj, N, C, kv_heads_);
  } else {
    for (long n = 0; n < N; ++n)
      for (int h = 0; h < kv_heads_; ++h)
        out[n * kv_heads_ + h] = q[(n * heads_ + h * G) * D + D - 1];
  }
}

template <typename T>
void Llama<T>::AllReduce(std::vector<T>& buffer) const {
  if (tp_->size() == 1) return;
  if (absl::Status s = tp_->AllReduceSum(buffer.data(), buffer.size()); !s.ok()) {
    // A failed collective leaves the ranks inconsistent; the trainer aborts the job on it.
    throw std::runtime_error("tensor-parallel all-reduce failed: " + s.ToString());
  }
}

template <typename T>
std::vector<T> Llama<T>::AllGather(const std::vector<T>& local) const {
  std::vector<T> all(local.size() * tp_->size());
  if (absl::Status s = tp_->AllGather(local.data(), all.data(), local.size()); !s.ok())
    throw std::runtime_error("tensor-parallel all-gather failed: " + s.ToString());
  return all;
}

template <typename T>
void Llama<T>::MlpForward(int l, const T* x, T* out, int N, T* rstd, T* xn, T* gate, T* up,
                          T* h) const {
  const int C = config_.hidden_size, F = ffn_;
  const LayerWeights w = layer(l);
  k::rmsnorm_forward(xn, rstd, x, w.mlp_norm, N, C, config_.rms_norm_eps);
  k::matmul_forward(gate, xn, w.w_gate, N, C, F);
  k::matmul_forward(up, xn, w.w_up, N, C, F);
  k::swiglu_forward(h, gate, up, N, F, F);
  std::vector<T> down(static_cast<size_t>(N) * C);
  k::matmul_forward(down.data(), h, w.w_down, N, F, C);
  AllReduce(down);
  for (size_t i = 0; i < down.size(); ++i) out[i] = x[i] + down[i];
}

template <typename T>
ForwardResult Llama<T>::Forward(const int32_t* tokens, const int32_t* targets, int B, int T_,
                                const StepOptions& options) {
  const bool loma = options.loma.enabled();
  if (loma) {
    if (absl::Status s = CheckLomaStep(options.loma, T_, config_); !s.ok())
      throw std::invalid_argument(s.ToString());
  } else if (T_ > config_.max_position_embeddings)
    throw std::invalid_argument(absl::StrFormat("sequence length %d exceeds max_position_embeddings %d",
                                                T_, config_.max_position_embeddings));
  for (long i = 0; i < static_cast<long>(B) * T_; ++i)
    // The vocabulary-parallel kernels would silently skip an id no rank holds: refuse it here.
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size || targets[i] >= config_.vocab_size)
      throw std::invalid_argument(absl::StrFormat(
          "token %d / target %d at %d is outside the vocabulary [0, %d)", tokens[i], targets[i], i,
          config_.vocab_size));
  batch_ = B;
  seq_ = T_;
  options_ = options;
  const int N = B * T_, C = config_.hidden_size, V = vocab_rows_, D = head_dim_;
  const int H = heads_, Hkv = kv_heads_, F = ffn_, L = config_.num_hidden_layers;
  const bool dmc = config_.dmc.enabled, dms = config_.dms.enabled;
  const bool qchannel = dms && config_.dms.variant == DmsVariant::kQueryChannel;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const T fade = static_cast<T>(options.control_fade);
  k::DmcGateParams gate_params{config_.dmc.init_val, config_.dmc.temperature, config_.dmc.omega_eps,
                               options.mode};
  const k::DmsGateParams dms_params{config_.dms.scale, config_.dms.offset,
                                    config_.dms.temperature, options.mode};
  distilling_ = distill_next_;
  distill_next_ = false;
  if (distilling_ && !dms)
    throw std::invalid_argument("a distillation target was set, but DMS eviction is off");
  if (distilling_ && teacher_logits_.size() != size_t(N) * V)
    throw std::invalid_argument(absl::StrFormat(
        "the distillation target has %d logits, the batch %d × %d local vocabulary rows",
        teacher_logits_.size(), N, V));
  tokens_.assign(tokens, tokens + N);
  targets_.assign(targets, targets + N);
  acts_.resize(L);
  mean_merge_.assign(B, T(0));
  const std::vector<int32_t> positions =
      loma ? LomaPositions(options.loma, T_) : std::vector<int32_t>();

  std::vector<T> x(static_cast<size_t>(N) * C);
  k::embedding_forward(x.data(), tokens, embedding(), N, C, vocab_begin_, vocab_rows_);
  AllReduce(x);  // vocabulary-parallel: each rank filled the rows of the tokens it holds
  for (int l = 0; l < L; ++l) {
    LayerActivations& a = acts_[l];
    const LayerWeights w = layer(l);
    a.x = x;
    Resize(a.xn, size_t(N) * C);
    Resize(a.rstd, N);
    Resize(a.q, size_t(N) * H * D);
    Resize(a.k, size_t(N) * Hkv * D);
    Resize(a.v, size_t(N) * Hkv * D);
    k::rmsnorm_forward(a.xn.data(), a.rstd.data(), a.x.data(), w.attn_norm, N, C,
                       config_.rms_norm_eps);
    k::matmul_forward(a.q.data(), a.xn.data(), w.wq, N, C, H * D);
    k::matmul_forward(a.k.data(), a.xn.data(), w.wk, N, C, Hkv * D);
    k::matmul_forward(a.v.data(), a.xn.data(), w.wv, N, C, Hkv * D);
    if (fade != T(1)) {
      k::scale_last_channel(a.q.data(), long(N) * H, D, fade);
      k::scale_last_channel(a.k.data(), long(N) * Hkv, D, fade);
    }
    const T* keys = a.k.data();
    const T* values = a.v.data();
    if (dmc) {
      const size_t G = size_t(N) * Hkv;
      for (auto* buf : {&a.noise, &a.logit, &a.alpha, &a.merge, &a.mask, &a.omega, &a.denom})
        Resize(*buf, G);
      if (options.mode == k::DmcDecisionMode::kRelaxed)
        k::logistic_noise(a.noise.data(), B, T_, Hkv, options.noise_seed,
                          (options.step << 16) | static_cast<uint64_t>(l), options.seq0,
                          tp_->rank() * Hkv, config_.num_key_value_heads);
      k::dmc_gates_forward<T>({a.logit.data(), a.alpha.data(), a.merge.data(), a.mask.data(),
                               a.omega.data()},
                              a.q.data(), a.k.data(), a.noise.data(), B, T_, H, Hkv, D,
                              gate_params);
      Resize(a.khat, a.k.size());
      Resize(a.vhat, a.v.size());
      k::dmc_scan_forward(a.khat.data(), a.denom.data(), a.k.data(), a.alpha.data(),
                          a.omega.data(), B, T_, Hkv, D, config_.dmc.window);
      k::dmc_scan_forward(a.vhat.data(), a.denom.data(), a.v.data(), a.alpha.data(),
                          a.omega.data(), B, T_, Hkv, D, config_.dmc.window);
      keys = a.khat.data();
      values = a.vhat.data();
    }
    if (dms) {
      const size_t G = size_t(N) * Hkv;
      for (auto* buf : {&a.noise, &a.logit, &a.alpha, &a.merge, &a.mask, &a.dms_x}) Resize(*buf, G);
      Resize(a.dms_rstd, dms_offsets_.empty() ? 0 : N);
      Resize(a.dms_xn, dms_offsets_.empty() ? 0 : size_t(N) * C);
      DmsDecisionInput(l, a.x.data(), a.q.data(), a.dms_x.data(), N, a.dms_rstd.data(),
                       a.dms_xn.data());
      if (qchannel) ZeroDmsQueryChannel(a.q.data(), N, H, Hkv, D);
      if (options.mode == k::DmcDecisionMode::kRelaxed)
        k::logistic_noise(a.noise.data(), B, T_, Hkv, options.noise_seed,
                          (options.step << 16) | static_cast<uint64_t>(l), options.seq0,
                          tp_->rank() * Hkv, config_.num_key_value_heads);
      k::dms_gates_forward(a.logit.data(), a.alpha.data(), a.merge.data(), a.mask.data(),
                           a.dms_x.data(), a.noise.data(), B, T_, Hkv, dms_params);
    }
    if (dmc || dms)
      k::cr_accumulate_merge(mean_merge_.data(), a.merge.data(), B, T_, Hkv,
                             T(1.0 / (double(L) * T_ * config_.num_key_value_heads)));
    Resize(a.qr, a.q.size());
    Resize(a.kr, a.k.size());
    Rope(a.qr.data(), a.q.data(), B, T_, H, D, positions, config_.rope_theta, dmc);
    Rope(a.kr.data(), keys, B, T_, Hkv, D, positions, config_.rope_theta, dmc);
    if (qchannel) ZeroDmsQueryChannel(a.qr.data(), N, H, Hkv, D);
    if (fade != T(1)) {
      k::scale_last_channel(a.qr.data(), long(N) * H, D, fade);
      k::scale_last_channel(a.kr.data(), long(N) * Hkv, D, fade);
    }
    Resize(a.att, a.q.size());
    Resize(a.lse, size_t(B) * H * T_);
    if (loma)
      k::loma_attention_forward(a.att.data(), a.lse.data(), a.qr.data(), a.kr.data(), values, B,
                                T_, H, Hkv, D, options.loma, scale);
    else
      k::dmc_attention_forward(a.att.data(), a.lse.data(), a.qr.data(), a.kr.data(), values,
                               dmc || dms ? a.mask.data() : nullptr, B, T_, H, Hkv, D, dmc, scale,
                               dms ? config_.dms.window : 0);
    std::vector<T> o(size_t(N) * C);
    k::matmul_forward(o.data(), a.att.data(), w.wo, N, H * D, C);
    AllReduce(o);
    Resize(a.x2, size_t(N) * C);
    for (size_t i = 0; i < o.size(); ++i) a.x2[i] = a.x[i] + o[i];

    Resize(a.xn2, size_t(N) * C);
    Resize(a.rstd2, N);
    Resize(a.gate, size_t(N) * F);
    Resize(a.up, size_t(N) * F);
    Resize(a.h, size_t(N) * F);
    MlpForward(l, a.x2.data(), x.data(), N, a.rstd2.data(), a.xn2.data(), a.gate.data(),
               a.up.data(), a.h.data());
  }
  x_final_ = x;
  Resize(xn_final_, size_t(N) * C);
  Resize(rstd_final_, N);
  k::rmsnorm_forward(xn_final_.data(), rstd_final_.data(), x_final_.data(), final_norm(), N, C,
                     config_.rms_norm_eps);
  Resize(logits_, size_t(N) * V);
  k::matmul_forward(logits_.data(), xn_final_.data(), lm_head(), N, C, V);
  // Vocabulary-parallel cross-entropy: the ranks exchange 2·N statistics, not the logits.
  std::vector<T> stats(2 * size_t(N));
  k::cross_entropy_shard_stats(stats.data(), logits_.data(), targets, N, V, vocab_begin_);
  Resize(losses_, N);
  Resize(lse_, N);
  k::cross_entropy_combine_shards(losses_.data(), lse_.data(), AllGather(stats).data(), targets, N,
                                  tp_->size());

  ForwardResult result;
  label_count_ = 0;
  double loss_sum = 0;
  for (int i = 0; i < N; ++i)
    if (targets[i] >= 0) {
      loss_sum += losses_[i];
      label_count_ += 1;
    }
  result.lm_loss = label_count_ > 0 ? loss_sum / label_count_ : 0.0;
  if (distilling_) {
    // model/DMS.md §4: the mean over labelled positions whose input is not EOS of KL(student ||
    // teacher)
    Resize(distill_weight_, N);
    double count = 0;
    for (int i = 0; i < N; ++i) count += targets[i] >= 0 && tokens[i] != config_.eos_token_id;
    for (int i = 0; i < N; ++i)
      if (targets[i] >= 0 && tokens[i] != config_.eos_token_id) distill_weight_[i] = T(1.0 / count);
    Resize(distill_kl_, N);
    k::kl_distill_shard(distill_kl_.data(), logits_.data(), teacher_logits_.data(), lse_.data(),
                        teacher_lse_.data(), distill_weight_.data(), N, V);
    AllReduce(distill_kl_);  // each rank summed its vocabulary rows' terms
    for (int i = 0; i < N; ++i) result.distill_loss += double(distill_weight_[i]) * distill_kl_[i];
  }
  if (dmc || dms) {
    // Each TP rank summed its own heads; the hinge needs all heads of a sequence (model/DMC.md §4 [ours]).
    AllReduce(mean_merge_);
    if (options.cr_prior > 0)
      result.cr_loss = k::cr_loss_forward(mean_merge_.data(), B, static_cast<T>(options.cr_prior));
    double total = 0;
    for (T m : mean_merge_) total += m;
    result.merge_fraction = total / B;
    result.layer_merge_fraction.assign(L, 0.0);
    std::vector<T> per_layer(L, T(0));
    for (int l = 0; l < L; ++l)
      for (T m : acts_[l].merge) per_layer[l] += m;
    AllReduce(per_layer);
    for (int l = 0; l < L; ++l)
      result.layer_merge_fraction[l] =
          per_layer[l] / (double(B) * T_ * config_.num_key_value_heads);
  }
  if (loma) {
    const LomaLosses zones = LomaZoneLosses(losses_.data(), targets, B, T_, options.loma, nullptr);
    result.lm_loss = zones.reading;
    result.rep_loss = zones.repetition;
  }
  result.loss = (distilling_ ? result.distill_loss : result.lm_loss) + result.cr_loss +
                result.rep_loss;
  return result;
}

std::vector<ParamSpec> UnwrittenGradients(const std::vector<ParamSpec>& specs,
                                          const LlamaConfig& config, bool eviction) {
  std::vector<ParamSpec> unwritten;
  for (const ParamSpec& s : specs) {
    const bool table = s.name == "model.embed_tokens.weight" && !config.tie_word_embeddings;
    const bool adapter = s.name.find(".dms_proj_alpha") != std::string::npos && !eviction;
    if (table || adapter) unwritten.push_back(s);
  }
  return unwritten;
}

template <typename T>
void Llama<T>::ZeroGrad() {
  zero_grad_pending_ = true;
}

template <typename T>
void Llama<T>::Backward(double loss_scale) {
  const int B = batch_, T_ = seq_;
  const int N = B * T_, C = config_.hidden_size, V = vocab_rows_, D = head_dim_;
  const int H = heads_, Hkv = kv_heads_, F = ffn_, L = config_.num_hidden_layers;
  const bool dmc = config_.dmc.enabled, dms = config_.dms.enabled;
  const bool qchannel = dms && config_.dms.variant == DmsVariant::kQueryChannel;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const T fade = static_cast<T>(options_.control_fade);
  k::DmcGateParams gate_params{config_.dmc.init_val, config_.dmc.temperature, config_.dmc.omega_eps,
                               options_.mode};
  const k::DmsGateParams dms_params{config_.dms.scale, config_.dms.offset,
                                    config_.dms.temperature, options_.mode};
  // Each parameter's gradient is written (the first Backward after ZeroGrad: accumulate false) or
  // added into by one call below: the *_dweight helpers, the embedding's scatter excepted.
  const bool add = !zero_grad_pending_;
  if (zero_grad_pending_)
    for (const ParamSpec& s : UnwrittenGradients(specs_, config_, dms))
      std::fill_n(grads_.begin() + s.offset, s.size, T(0));
  zero_grad_pending_ = false;
  auto grad_of = [&](size_t offset) { return grads_.data() + offset; };
  T* const no_grad = nullptr;
  auto linear_dweight = [&](size_t offset, const T* dout, const T* inp, int IC, int OC) {
    k::matmul_backward(no_grad, grad_of(offset), dout, inp, params_.data() + offset, N, IC, OC,
                       add);
  };
  auto norm_dweight = [&](size_t offset, const T* dout, const T* inp, const T* rstd) {
    k::rmsnorm_backward(no_grad, grad_of(offset), dout, inp, params_.data() + offset, rstd, N, C,
                        add);
  };
  const bool loma = options_.loma.enabled();
  const std::vector<int32_t> positions =
      loma ? LomaPositions(options_.loma, T_) : std::vector<int32_t>();

  // Loss = mean over labelled positions of the cross-entropy (LoMA: one mean per zone, summed).
  std::vector<T> dlosses(N, T(0));
  if (loma) {
    std::vector<double> weights;
    LomaZoneLosses(losses_.data(), targets_.data(), B, T_, options_.loma, &weights);
    for (int i = 0; i < N; ++i) dlosses[i] = T(loss_scale * weights[i]);
  } else if (!distilling_) {
    for (int i = 0; i < N; ++i)
      if (targets_[i] >= 0) dlosses[i] = T(loss_scale / label_count_);
  }
  std::vector<T> dlogits(size_t(N) * V, T(0));
  if (distilling_)
    k::kl_distill_shard_backward(dlogits.data(), logits_.data(), teacher_logits_.data(),
                                 lse_.data(), teacher_lse_.data(), distill_kl_.data(),
                                 distill_weight_.data(), T(loss_scale), N, V,
                                 /*accumulate=*/false);
  else
    k::cross_entropy_shard_backward(dlogits.data(), logits_.data(), lse_.data(), targets_.data(),
                                    dlosses.data(), N, V, vocab_begin_, /*accumulate=*/false);
  // As in the CUDA model, each activation gradient is written by its first writer (accumulate
  // false) and added into by the later ones (true).
  std::vector<T> dxn(size_t(N) * C, T(0)), dres(size_t(N) * C, T(0));
  k::matmul_backward(dxn.data(), no_grad, dlogits.data(), xn_final_.data(), lm_head(), N, C, V,
                     /*accumulate=*/false);
  // A tied LM head's gradient is the embedding's: written here, before the lookup's scatter.
  linear_dweight(lm_head_offset_, dlogits.data(), xn_final_.data(), C, V);
  AllReduce(dxn);  // vocabulary-parallel LM head: each rank holds its rows' share of the sum
  k::rmsnorm_backward(dres.data(), no_grad, dxn.data(), x_final_.data(), final_norm(),
                      rstd_final_.data(), N, C, /*accumulate=*/false);
  norm_dweight(final_norm_offset_, dxn.data(), x_final_.data(), rstd_final_.data());

  // CR loss gradient w.r.t. each sequence's mean merge fraction (replicated over TP ranks).
  std::vector<T> dmean_merge(B, T(0));
  if ((dmc || dms) && options_.cr_prior > 0)
    k::cr_loss_backward(dmean_merge.data(), mean_merge_.data(), B,
                        static_cast<T>(options_.cr_prior), T(loss_scale));

  std::vector<T> dh, dgate, dup, datt, dqr, dkr, dq, dk, dv, dkhat, dvhat;
  std::vector<T> dalpha, dmerge, dmask, domega, ddec, dxn_dms;
  for (int l = L - 1; l >= 0; --l) {
    LayerActivations& a = acts_[l];
    const LayerWeights w = layer(l);
    const size_t* o = &layer_offsets_[l * kLayerTensors];

    // MLP half: dres flows to x2 unchanged (residual) and through down ∘ swiglu ∘ gate/up ∘ norm.
    Resize(dh, size_t(N) * F);
    k::matmul_backward(dh.data(), no_grad, dres.data(), a.h.data(), w.w_down, N, F, C,
                       /*accumulate=*/false);
    linear_dweight(o[kDown], dres.data(), a.h.data(), F, C);
    Resize(dgate, dh.size());
    Resize(dup, dh.size());
    k::swiglu_backward(dgate.data(), dup.data(), dh.data(), a.gate.data(), a.up.data(), N, F, F,
                       /*accumulate=*/false);
    Resize(dxn, size_t(N) * C);
    k::matmul_backward(dxn.data(), no_grad, dgate.data(), a.xn2.data(), w.w_gate, N, C, F,
                       /*accumulate=*/false);
    k::matmul_backward(dxn.data(), no_grad, dup.data(), a.xn2.data(), w.w_up, N, C, F,
                       /*accumulate=*/true);
    linear_dweight(o[kGate], dgate.data(), a.xn2.data(), C, F);
    linear_dweight(o[kUp], dup.data(), a.xn2.data(), C, F);
    AllReduce(dxn);  // column-parallel input: every rank holds a partial sum
    k::rmsnorm_backward(dres.data(), no_grad, dxn.data(), a.x2.data(), w.mlp_norm, a.rstd2.data(),
                        N, C, /*accumulate=*/true);
    norm_dweight(o[kMlpNorm], dxn.data(), a.x2.data(), a.rstd2.data());

    // Attention half.
    Resize(datt, a.att.size());
    k::matmul_backward(datt.data(), no_grad, dres.data(), a.att.data(), w.wo, N, H * D, C,
                       /*accumulate=*/false);
    linear_dweight(o[kWo], dres.data(), a.att.data(), H * D, C);
    Resize(dqr, a.q.size());
    Resize(dkr, a.k.size());
    Resize(dvhat, a.v.size());
    Resize(dmask, dmc || dms ? a.mask.size() : 0);
    const T* values = dmc ? a.vhat.data() : a.v.data();
    if (loma)
      k::loma_attention_backward(dqr.data(), dkr.data(), dvhat.data(), datt.data(), a.qr.data(),
                                 a.kr.data(), values, a.att.data(), a.lse.data(), B, T_, H, Hkv,
                                 D, options_.loma, scale, /*accumulate=*/false);
    else
      k::dmc_attention_backward(dqr.data(), dkr.data(), dvhat.data(),
                                dmc || dms ? dmask.data() : nullptr, datt.data(), a.qr.data(),
                                a.kr.data(), values, dmc || dms ? a.mask.data() : nullptr,
                                a.att.data(), a.lse.data(), B, T_, H, Hkv, D, dmc, scale,
                                /*accumulate=*/false, dms ? config_.dms.window : 0);
    if (qchannel) ZeroDmsQueryChannel(dqr.data(), N, H, Hkv, D);
    if (fade != T(1)) {
      k::scale_last_channel(dqr.data(), long(N) * H, D, fade);
      k::scale_last_channel(dkr.data(), long(N) * Hkv, D, fade);
    }
    Resize(dq, a.q.size());
    Resize(dkhat, a.k.size());
    RopeBackward(dq.data(), dqr.data(), B, T_, H, D, positions, config_.rope_theta, dmc);
    RopeBackward(dkhat.data(), dkr.data(), B, T_, Hkv, D, positions, config_.rope_theta, dmc);
    if (dmc) {
      Resize(dk, a.k.size());
      Resize(dv, a.v.size());
      Resize(dalpha, a.alpha.size());
      Resize(domega, a.omega.size());
      Resize(dmerge, a.merge.size());
      k::dmc_scan_backward(dk.data(), dalpha.data(), domega.data(), dkhat.data(), a.k.data(),
                           a.khat.data(), a.alpha.data(), a.omega.data(), a.denom.data(), B, T_,
                           Hkv, D, config_.dmc.window, /*accumulate=*/false);
      k::dmc_scan_backward(dv.data(), dalpha.data(), domega.data(), dvhat.data(), a.v.data(),
                           a.vhat.data(), a.alpha.data(), a.omega.data(), a.denom.data(), B, T_,
                           Hkv, D, config_.dmc.window, /*accumulate=*/false);
      k::cr_accumulate_merge_backward(dmerge.data(), dmean_merge.data(), B, T_, Hkv,
                                      T(1.0 / (double(L) * T_ * config_.num_key_value_heads)));
      k::dmc_gates_backward(dq.data(), dk.data(), dalpha.data(), dmerge.data(), dmask.data(),
                            domega.data(), a.q.data(), a.logit.data(), a.alpha.data(), B, T_, H,
                            Hkv, D, gate_params);
    } else {
      dk.swap(dkhat);
      dv.swap(dvhat);
    }
    if (dms) {
      Resize(dmerge, a.merge.size());
      k::cr_accumulate_merge_backward(dmerge.data(), dmean_merge.data(), B, T_, Hkv,
                                      T(1.0 / (double(L) * T_ * config_.num_key_value_heads)));
      Resize(ddec, a.dms_x.size());
      k::dms_gates_backward(ddec.data(), dmerge.data(), dmask.data(), a.logit.data(),
                            a.alpha.data(), B, T_, Hkv, dms_params, /*accumulate=*/false);
      if (qchannel) {
        // the channel was zeroed for attention, so the decision is its only use
        const int G = H / Hkv;
        for (long n = 0; n < N; ++n)
          for (int h = 0; h < Hkv; ++h) dq[(n * H + h * G) * D + D - 1] = ddec[n * Hkv + h];
      }
    }
    if (fade != T(1)) {
      k::scale_last_channel(dq.data(), long(N) * H, D, fade);
      k::scale_last_channel(dk.data(), long(N) * Hkv, D, fade);
    }
    Resize(dxn, size_t(N) * C);
    k::matmul_backward(dxn.data(), no_grad, dq.data(), a.xn.data(), w.wq, N, C, H * D,
                       /*accumulate=*/false);
    k::matmul_backward(dxn.data(), no_grad, dk.data(), a.xn.data(), w.wk, N, C, Hkv * D,
                       /*accumulate=*/true);
    k::matmul_backward(dxn.data(), no_grad, dv.data(), a.xn.data(), w.wv, N, C, Hkv * D,
                       /*accumulate=*/true);
    linear_dweight(o[kWq], dq.data(), a.xn.data(), C, H * D);
    linear_dweight(o[kWk], dk.data(), a.xn.data(), C, Hkv * D);
    linear_dweight(o[kWv], dv.data(), a.xn.data(), C, Hkv * D);
    AllReduce(dxn);
    if (dms && w.dms_proj) {  // the adapter reads the residual through its own norm
      Resize(dxn_dms, size_t(N) * C);
      k::matmul_backward(dxn_dms.data(), no_grad, ddec.data(), a.dms_xn.data(), w.dms_proj, N, C,
                         Hkv, /*accumulate=*/false);
      linear_dweight(dms_offsets_[2 * l + 1], ddec.data(), a.dms_xn.data(), C, Hkv);
      AllReduce(dxn_dms);  // column-parallel over KV heads
      k::rmsnorm_backward(dres.data(), no_grad, dxn_dms.data(), a.x.data(), w.dms_norm,
                          a.dms_rstd.data(), N, C, /*accumulate=*/true);
      norm_dweight(dms_offsets_[2 * l], dxn_dms.data(), a.x.data(), a.dms_rstd.data());
    }
    k::rmsnorm_backward(dres.data(), no_grad, dxn.data(), a.x.data(), w.attn_norm, a.rstd.data(),
                        N, C, /*accumulate=*/true);
    norm_dweight(o[kAttnNorm], dxn.data(), a.x.data(), a.rstd.data());
  }
  // A scatter, which adds: after ZeroGrad, the tied LM head's product wrote the table, or the
  // zeroing at the start did.
  k::embedding_backward(grad_of(embed_offset_), dres.data(), tokens_.data(), N, C, vocab_begin_,
                       vocab_rows_);
}

template class Llama<float>;
template class Llama<double>;

}  // namespace dmc::model
