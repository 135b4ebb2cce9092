// A Llama decoder with Dynamic Memory Compression heads, forward and hand-written backward, on
// the CPU reference kernels. T is float for training and double for gradient checks.
//
// Tensor parallelism (Megatron-style) is built in: with tp_size > 1 this object holds one rank's
// shard — q/k/v and gate/up projections split by output rows (column-parallel), o and down
// projections split by input columns (row-parallel), so attention heads, their DMC decisions and
// scans stay local to a rank. The two row-parallel outputs are all-reduced in the forward pass and
// the inputs of the column-parallel projections in the backward pass. Embedding and LM head are
// vocabulary-parallel (split by vocabulary rows, Megatron's VocabParallelEmbedding and
// VocabParallelCrossEntropy): the embedding output is all-reduced, the cross-entropy exchanges
// per-row statistics instead of logits, and the LM head's input gradient is all-reduced. Norms
// are replicated.
//
// DMS (model/config.h DmsConfig, model/DMS.md): with eviction on, each layer computes one decision
// input x per (token, KV head) — the adapter Linear(RMSNorm(residual)) (its projection split by KV
// heads over TP, its norm replicated) or the query channel q[h·G, D-1] (then zeroed in that head
// before and after RoPE) — turns it into decisions (kernels/dms_gates.h) and attends under the
// delayed-eviction mask (kernels/dmc_attention.h with window w). Given a teacher's logits on the
// same batch (SetDistillationTarget), the loss is KL(student || teacher) (kernels/kl_distill.h,
// vocabulary-parallel) + the compression loss; the LM loss is then only reported. The adapter
// variant freezes every other parameter (ParamSpec::frozen).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dmc_gates.h"
#include "kernels/loma_mask.h"
#include "model/config.h"
#include "parallel/communicator.h"

namespace dmc::model {

// A layer's tensors, in the order they lie in the flat parameter buffer. gate_proj and up_proj
// are adjacent there, rows [2F, C] together: the CUDA model and the GPU engine run them as one
// GEMM; so are q_proj, k_proj and v_proj, rows [(H + 2·Hkv)·D, C]: the GPU engine's decode step
// runs them as one.
enum LayerTensor { kAttnNorm, kWq, kWk, kWv, kWo, kMlpNorm, kGate, kUp, kDown, kLayerTensors };

// One parameter tensor of this rank, inside the flat parameter buffer.
struct ParamSpec {
  std::string name;             // Hugging Face tensor name, e.g. model.layers.0.self_attn.q_proj.weight
  std::vector<int64_t> shape;   // local (this rank's) shape
  std::vector<int64_t> full_shape;
  int split_dim = -1;           // -1: replicated; 0: rows split across TP ranks; 1: columns split
  int64_t split_begin = 0;      // this rank's first index along split_dim (TpShard)
  size_t offset = 0;            // into params()/grads()
  size_t size = 0;
  bool weight_decay = false;    // matrices decay, norms do not
  bool frozen = false;          // not trained: the base of a DMS adapter model
};

// The contiguous part [begin, begin + size) of a dimension of `full` indices that TP rank `rank`
// of `ranks` holds: as even as possible, the first full % ranks ranks hold one more. Heads and the
// MLP split evenly (the model checks); the vocabulary need not divide.
struct TpSlice {
  int64_t begin = 0, size = 0;
};
TpSlice TpShard(int64_t full, int rank, int ranks);

// What one training or evaluation step asks of the model.
struct StepOptions {
  kernels::DmcDecisionMode mode = kernels::DmcDecisionMode::kRelaxed;
  uint64_t noise_seed = 0;   // logistic noise is a pure function of (seed, step, layer, position)
  uint64_t step = 0;
  long seq0 = 0;             // global index of this rank's first sequence (data parallelism)
  float cr_prior = 0.0f;     // p = 1 - 1/CR target; the CR loss is active when > 0
  float control_fade = 1.0f; // stage 1: multiplier m of the control channel (1 = off)
  // LoMA (model/loma.h): when enabled, the sequences are in the LoMA layout and attention uses its
  // block mask and position ids instead of the causal mask and positions 0..T-1.
  kernels::LomaZones loma;
};

struct ForwardResult {
  double lm_loss = 0;        // mean cross-entropy over labelled positions (LoMA: reading zones)
  double cr_loss = 0;        // DMC compression-ratio loss (0 when DMC is off)
  double rep_loss = 0;       // LoMA reconstruction loss on the repetition zones (0 when off)
  double distill_loss = 0;   // DMS: KL(student || teacher) when distilling (0 otherwise)
  // distill_loss (when distilling) or lm_loss, + cr_loss + rep_loss: what backward differentiates
  double loss = 0;
  // mean hard merge (DMC) or eviction (DMS) decision over layers, heads, positions, sequences
  double merge_fraction = 0;
  std::vector<double> layer_merge_fraction;  // per layer
  double achieved_cr() const { return 1.0 / (1.0 - merge_fraction); }
};

// The tensors whose gradients a Backward that follows ZeroGrad does not write, so it zeroes them:
// the embedding table unless the LM head shares it (the lookup's backward is a scatter that only
// adds, so the tied LM head's product, which comes first, writes the table), and the DMS adapter
// while eviction is off (its branch does not run).
std::vector<ParamSpec> UnwrittenGradients(const std::vector<ParamSpec>& specs,
                                          const LlamaConfig& config, bool eviction);

// DMS query-channel variant: q [N, H, D] → q[n, h·G, D-1] = 0 for every KV head h, before and
// after RoPE (the channel carries the decision, not attention content; model/DMS.md §1).
template <typename T>
void ZeroDmsQueryChannel(T* q, long N, int H, int Hkv, int D);

template <typename T>
class Llama {
 public:
  // comm is the tensor-parallel group (size 1 for a single process); it must outlive the model.
  Llama(const LlamaConfig& config, parallel::Communicator* tp_comm);

  const LlamaConfig& config() const { return config_; }
  const std::vector<ParamSpec>& param_specs() const { return specs_; }
  const ParamSpec* FindParam(const std::string& name) const;
  // The offsets of every layer's tensors, [layer · kLayerTensors + LayerTensor].
  const std::vector<size_t>& layer_offsets() const { return layer_offsets_; }
  std::vector<T>& params() { return params_; }
  const std::vector<T>& params() const { return params_; }
  // The gradients; a ZeroGrad still pending (below) is carried out first.
  std::vector<T>& grads() {
    if (zero_grad_pending_) std::fill(grads_.begin(), grads_.end(), T(0));
    zero_grad_pending_ = false;
    return grads_;
  }

  // Normal(0, 0.02) matrices (output projections scaled by 1/sqrt(2L), as GPT-2/llm.c do), unit
  // norms; every value a function of (seed, tensor, full-tensor index), so every TP layout draws
  // the same full model.
  void InitRandom(uint64_t seed);

  // End of DMC stage 1: zero the weight rows that produce q[D-1] and k[D-1] of every head, so
  // stage 2 starts with a = -init_val and omega = sigmoid(init_val) exactly.
  void ZeroControlChannelRows();

  // tokens, targets [B, T]; targets < 0 are unlabelled. Keeps the activations for Backward.
  ForwardResult Forward(const int32_t* tokens, const int32_t* targets, int B, int seq_len,
                        const StepOptions& options);
  // Accumulates loss_scale · d(loss)/d(params) of the last Forward into grads(); loss_scale is
  // 1/micro_batches under gradient accumulation. The first Backward after ZeroGrad writes them.
  void Backward(double loss_scale = 1.0);
  // Enables or disables the model's compression, DMC merging or (a DMS model) DMS eviction; the
  // trainer switches it on at stage 2.
  void set_compression_enabled(bool enabled);
  // DMS: the teacher's logits [B, T, V_local] (this rank's vocabulary rows) and logsumexps [B·T]
  // on the batch of the next Forward, which then distils (ForwardResult::distill_loss) and
  // consumes them. A teacher's Forward leaves both in its logits() and lse().
  void SetDistillationTarget(const std::vector<T>& logits, const std::vector<T>& lse);
  // DMS: the decision input x [N, Hkv_local] of layer l for rows with residual input `x_res`
  // [N, C] and pre-RoPE queries q [N, H_local, D] (kAdapter reads x_res, keeping rstd [N] and
  // xn [N, C] for the backward; kQueryChannel reads q). Shared with the decoder.
  void DmsDecisionInput(int l, const T* x_res, const T* q, T* out, int N, T* rstd, T* xn) const;
  // The gradients are zero from here on, without a pass over them: the next Backward's first
  // writer of each gradient writes it (accumulate false) instead of adding to it, and that
  // Backward zeroes only the tensors none of its writers write (UnwrittenGradients); a use of
  // grads() before it zeroes them all. LlamaCuda::ZeroGrad does the same, sparing a training step
  // a memory pass over every gradient.
  void ZeroGrad();

  // Logits [B, T, V_local] of the last Forward: the vocabulary rows [vocab_begin(),
  // vocab_begin() + vocab_rows()) of this rank (all of them for a single process).
  const std::vector<T>& logits() const { return logits_; }
  // Global logsumexp of each labelled row's logits in the last Forward (0 for unlabelled rows).
  const std::vector<T>& lse() const { return lse_; }
  // Hard merge (DMC) or eviction (DMS) decisions [B, T, Hkv_local] of layer l in the last
  // Forward (compression on).
  const std::vector<T>& merge(int layer) const { return acts_[layer].merge; }
  // Their decision logits a [B, T, Hkv_local] (kHard: the decision is 1[a > 0]; DMC:
  // a = k[D-1] - init_val, DMS: a = scale · x - offset, kernels/dmc_gates.h, dms_gates.h).
  const std::vector<T>& decision_logits(int layer) const { return acts_[layer].logit; }
  // Pre-RoPE keys and values [B, T, Hkv_local, D] and importances [B, T, Hkv_local] (DMC on) of
  // layer l in the last Forward: what a parallel prefill builds the inference cache from.
  const std::vector<T>& keys(int layer) const { return acts_[layer].k; }
  const std::vector<T>& values(int layer) const { return acts_[layer].v; }
  const std::vector<T>& omega(int layer) const { return acts_[layer].omega; }
  // Rotated queries [B, T, H_local, D] and keys [B, T, Hkv_local, D] of layer l in the last
  // Forward of a model without compression: what the calibrations of inference/layer_budgets.h
  // read.
  const std::vector<T>& rotated_queries(int layer) const { return acts_[layer].qr; }
  const std::vector<T>& rotated_keys(int layer) const { return acts_[layer].kr; }

  int local_heads() const { return heads_; }
  int local_kv_heads() const { return kv_heads_; }
  int local_ffn() const { return ffn_; }
  int tp_rank() const { return tp_->rank(); }
  int vocab_begin() const { return vocab_begin_; }
  int vocab_rows() const { return vocab_rows_; }

  // Weights of one layer, for code that runs the same layer token by token (the decoder).
  struct LayerWeights {
    const T *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;
    const T *dms_norm, *dms_proj;  // the DMS adapter (null unless kAdapter)
  };
  LayerWeights layer(int l) const;
  const T* embedding() const { return params_.data() + embed_offset_; }
  const T* final_norm() const { return params_.data() + final_norm_offset_; }
  const T* lm_head() const { return params_.data() + lm_head_offset_; }

  // The MLP half of a layer on rows [N, C]: out = x + down(swiglu(gate(norm x), up(norm x))),
  // all-reduced over TP. Shared with the decoder.
  void MlpForward(int l, const T* x, T* out, int N, T* rstd, T* xn, T* gate, T* up, T* h) const;

 private:
  struct LayerActivations {
    std::vector<T> x, xn, rstd, q, k, v, qr, kr, att, lse, x2, xn2, rstd2, gate, up, h;
    // DMC: gates, accumulated keys/values, scan denominators
    std::vector<T> noise, logit, alpha, merge, mask, omega, khat, vhat, denom;
    // DMS: the decision input, and the adapter's norm statistics (merge holds the evictions)
    std::vector<T> dms_x, dms_xn, dms_rstd;
  };
  size_t AddParam(const std::string& name, std::vector<int64_t> full_shape, int split_dim,
                  bool decay);
  void AllReduce(std::vector<T>& buffer) const;
  // Every TP rank's `local` (the same size on each), concatenated in rank order.
  std::vector<T> AllGather(const std::vector<T>& local) const;

  LlamaConfig config_;
  parallel::Communicator* tp_;
  int heads_, kv_heads_, ffn_, head_dim_;
  int vocab_begin_ = 0, vocab_rows_ = 0;  // this rank's rows of the embedding and LM head
  std::vector<ParamSpec> specs_;
  std::vector<T> params_, grads_;
  bool zero_grad_pending_ = false;  // ZeroGrad was called, and neither Backward nor grads() since
  size_t embed_offset_ = 0, final_norm_offset_ = 0, lm_head_offset_ = 0;
  std::vector<size_t> layer_offsets_;  // per layer: attn_norm, wq, wk, wv, wo, mlp_norm, gate, up, down
  std::vector<size_t> dms_offsets_;    // per layer: the DMS adapter's norm and projection

  // Last forward.
  int batch_ = 0, seq_ = 0;
  StepOptions options_;
  std::vector<int32_t> tokens_, targets_;
  std::vector<LayerActivations> acts_;
  std::vector<T> x_final_, xn_final_, rstd_final_, logits_, losses_, lse_, mean_merge_;
  double label_count_ = 0;
  // DMS distillation: the teacher's logits and logsumexps, whether the next / the last Forward
  // distils, the per-row loss weights and KL values of the last Forward
  std::vector<T> teacher_logits_, teacher_lse_, distill_weight_, distill_kl_;
  bool distill_next_ = false, distilling_ = false;
};

}  // namespace dmc::model
