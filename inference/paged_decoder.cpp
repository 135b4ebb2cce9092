#include "inference/paged_decoder.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "absl/strings/str_format.h"
#include "kernels/decode_attention.h"
#include "kernels/dmc_gates.h"
#include "kernels/dms_gates.h"
#include "kernels/embedding.h"
#include "kernels/loma_mask.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"

namespace dmc::inference {
namespace k = dmc::kernels;

namespace {
absl::Status CheckToken(int32_t token, int vocab_size) {
  if (token < 0 || token >= vocab_size)
    return absl::InvalidArgumentError(
        absl::StrFormat("token id %d is outside the vocabulary [0, %d)", token, vocab_size));
  return absl::OkStatus();
}
}  // namespace

PagedCacheOptions CacheOptionsFor(const model::LlamaConfig& config, CacheMethod method,
                                  long budget_bytes, int page_size) {
  PagedCacheOptions o;
  o.layers = config.num_hidden_layers;
  o.kv_heads = config.num_key_value_heads;
  o.head_dim = config.head_dim();
  o.page_size = page_size;
  o.budget_bytes = budget_bytes;
  o.dmc_window = method == CacheMethod::kDmc && config.dmc.enabled ? config.dmc.window : 0;
  return o;
}

PagedCacheOptions CacheOptionsFor(const model::LlamaConfig& config, const CachePolicy& policy,
                                  long budget_bytes, int page_size) {
  PagedCacheOptions o = CacheOptionsFor(config, policy.method, budget_bytes, page_size);
  o.quant = policy.quant;
  o.think_channels = policy.think_channels;
  // DmsUpdate removes token t - w - 1 at step t at the latest: older ones stay for good.
  const bool dms = policy.method == CacheMethod::kDms && config.dms.enabled;
  o.settle_lag = KvSettles(o) && dms ? config.dms.window + 1 : 0;
  return o;
}

template <typename T>
absl::StatusOr<std::unique_ptr<PagedDecoder<T>>> PagedDecoder<T>::Create(
    const model::Llama<T>& model, const CachePolicy& policy, PagedKvCache<T>* cache) {
  const model::LlamaConfig& c = model.config();
  if (model.local_heads() != c.num_attention_heads)
    return absl::InvalidArgumentError("the paged decoder needs a tensor-parallel size 1 model");
  const PagedCacheOptions want =
      CacheOptionsFor(c, policy, cache->options().budget_bytes, cache->options().page_size);
  const PagedCacheOptions& got = cache->options();
  if (absl::Status s = ValidatePageSize(got.page_size); !s.ok()) return s;
  const auto quant = [](const kernels::KvQuantOptions& q) {
    return std::make_tuple(q.bits, q.value_group, q.salient_bits, q.salient_slots, q.token_keys,
                           q.key_group);
  };
  if (got.layers != want.layers || got.kv_heads != want.kv_heads ||
      got.head_dim != want.head_dim || got.dmc_window != want.dmc_window ||
      quant(got.quant) != quant(want.quant) || got.settle_lag != want.settle_lag ||
      got.think_channels != want.think_channels)
    return absl::InvalidArgumentError(absl::StrFormat(
        "cache shape (layers %d, KV heads %d, head dim %d, window %d, page size %d, %d-bit, "
        "settle lag %d, ThinK channels %d) does not fit the model and policy %s (layers %d, KV "
        "heads %d, head dim %d, window %d, %d-bit, settle lag %d, ThinK channels %d)",
        got.layers, got.kv_heads, got.head_dim, got.dmc_window, got.page_size, got.quant.bits,
        got.settle_lag, got.think_channels, PolicyName(policy), want.layers, want.kv_heads,
        want.head_dim, want.dmc_window, want.quant.bits, want.settle_lag, want.think_channels));
  if (absl::Status s = ValidateKvQuant(policy, c.head_dim(), got.page_size); !s.ok()) return s;
  if (absl::Status s = ValidateThink(policy, c.head_dim()); !s.ok()) return s;
  if (absl::Status s = ValidateKvSharing(policy, c.num_hidden_layers); !s.ok()) return s;
  if ((policy.method == CacheMethod::kDms) != c.dms.enabled)
    return absl::InvalidArgumentError(
        policy.method == CacheMethod::kDms
            ? "the dms cache needs a DMS model with eviction on (config.json \"dms\")"
            : absl::StrFormat("a DMS model evicts by its own decisions: decode it with the dms "
                              "cache, not %s",
                              CacheMethodName(policy.method)));
  if (absl::Status s = ValidateEvictionBudgets(policy, c.num_hidden_layers); !s.ok()) return s;
  // The model's config is valid (Llama checks it): a LoMA model has DMC and DMS off.
  if (policy.method == CacheMethod::kLoma && !c.loma.enabled())
    return absl::InvalidArgumentError(
        "the loma method needs a LoMA model (a config with \"loma\" settings)");
  return std::unique_ptr<PagedDecoder<T>>(new PagedDecoder<T>(model, policy, cache));
}

template <typename T>
absl::Status CacheToken(PagedKvCache<T>& cache, const model::LlamaConfig& config, CacheMethod method,
                        int seq, int layer, int h, const T* key, const T* value, T omega,
                        bool merge, int pos) {
  const int D = config.head_dim();
  const bool dmc = config.dmc.enabled;
  std::vector<T> raw(key, key + D);
  if (method == CacheMethod::kDmc) {
    absl::StatusOr<T*> open =
        cache.AddDmc(seq, layer, h, key, value, dmc ? omega : T(1), dmc && pos > 0 && merge, pos);
    if (!open.ok()) return open.status();
    // The open slot holds the pre-RoPE mean; rotate it at the newest token's position.
    std::copy(*open, *open + D, raw.begin());
    k::rope_forward(*open, raw.data(), 1, 1, 1, D, pos, config.rope_theta, dmc);
    return absl::OkStatus();
  }
  std::vector<T> rotated(D);
  k::rope_forward(rotated.data(), raw.data(), 1, 1, 1, D, pos, config.rope_theta, dmc);
  if (absl::Status s = cache.Append(seq, layer, h, rotated.data(), value, pos); !s.ok()) return s;
  if (method != CacheMethod::kDms) return absl::OkStatus();
  return DmsUpdate(cache, seq, layer, h, pos, pos > 0 && merge, config.dms.window);
}

template <typename T>
absl::Status PagedDecoder<T>::UpdateCache(const std::vector<int>& seqs, const int* positions,
                                          int first_row, int layer) {
  const model::LlamaConfig& c = model_.config();
  const int D = c.head_dim(), Hkv = c.num_key_value_heads;
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int h = 0; h < Hkv; ++h) {
      const size_t g = (first_row + i) * Hkv + h, r = g * D;
      if (absl::Status s = CacheToken(*cache_, c, policy_.method, seqs[i], layer, h,
                                      k_.data() + r, v_.data() + r, c.dmc.enabled ? omega_[g] : T(1),
                                      c.compression_enabled() && alpha_[g] > T(0.5), positions[i]);
          !s.ok())
        return s;
    }
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<std::vector<T>> Prefill(model::Llama<T>& model, CacheMethod method,
                                       PagedKvCache<T>* cache, int seq,
                                       const std::vector<int32_t>& prompt) {
  const model::LlamaConfig& c = model.config();
  const int P = static_cast<int>(prompt.size()), L = c.num_hidden_layers;
  const int Hkv = c.num_key_value_heads, D = c.head_dim();
  if (method != CacheMethod::kDmc && method != CacheMethod::kDms &&
      method != CacheMethod::kVanilla)
    return absl::InvalidArgumentError(absl::StrFormat(
        "parallel prefill serves the dmc, dms and vanilla caches, not %s (it evicts by each "
        "step's attention: feed the prompt token by token)",
        CacheMethodName(method)));
  if (!cache->contains(seq) || cache->tokens(seq) != 0)
    return absl::FailedPreconditionError(
        absl::StrFormat("prefill needs sequence %d admitted to the cache and still empty", seq));
  if (P < 1 || P > c.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrFormat(
        "the prompt has %d tokens; it must have 1 to %d (max_position_embeddings)", P,
        c.max_position_embeddings));
  if (cache->options().quant.salient_slots > 0)
    return absl::InvalidArgumentError(
        "parallel prefill does not serve ZipCache's mixed precision (it ranks slots by each "
        "step's attention): feed the prompt token by token");
  if (KvThink(cache->options()))
    return absl::InvalidArgumentError(
        "parallel prefill does not serve ThinK (it scores key channels by the queries each step "
        "observes): feed the prompt token by token");
  // Worst case, every token opens a slot: check the pages before anything changes.
  const int page = cache->options().page_size;
  const long pages = static_cast<long>(L) * Hkv * ((P + page - 1) / page);
  if (pages > cache->allocator().free_pages())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "a prompt of %d tokens may need %ld more KV pages; the budget has %ld free", P, pages,
        cache->allocator().free_pages()));

  model::StepOptions options;
  options.mode = kernels::DmcDecisionMode::kHard;
  const std::vector<int32_t> no_targets(P, -1);
  model.Forward(prompt.data(), no_targets.data(), 1, P, options);
  for (int l = 0; l < L; ++l) {
    const std::vector<T>& keys = model.keys(l);
    const std::vector<T>& values = model.values(l);
    for (int t = 0; t < P; ++t)
      for (int h = 0; h < Hkv; ++h) {
        const size_t r = (size_t(t) * Hkv + h) * D, g = size_t(t) * Hkv + h;
        if (absl::Status s = CacheToken(*cache, c, method, seq, l, h, keys.data() + r,
                                        values.data() + r,
                                        c.dmc.enabled ? model.omega(l)[g] : T(1),
                                        c.compression_enabled() && model.merge(l)[g] > T(0.5), t);
            !s.ok())
          return s;
      }
  }
  for (int t = 0; t < P; ++t) cache->AdvanceToken(seq);
  return model.logits();
}

template <typename T>
absl::Status PagedDecoder<T>::Step(const std::vector<int>& seqs, const int32_t* tokens,
                                   std::vector<T>* logits) {
  const model::LlamaConfig& c = model_.config();
  const int n = static_cast<int>(seqs.size());
  std::vector<int> positions(n);
  for (int i = 0; i < n; ++i) {
    if (!cache_->contains(seqs[i]))
      return absl::NotFoundError(absl::StrFormat("sequence %d is not in the cache", seqs[i]));
    if (cache_->tokens(seqs[i]) >= c.max_position_embeddings)
      return absl::OutOfRangeError(absl::StrFormat(
          "sequence %d is full: max_position_embeddings is %d", seqs[i],
          c.max_position_embeddings));
    if (absl::Status s = CheckToken(tokens[i], c.vocab_size); !s.ok()) return s;
    positions[i] = cache_->tokens(seqs[i]);
  }
  if (absl::Status s = CanStep(seqs); !s.ok()) return s;
  if (absl::Status s = Run(seqs, positions, tokens, n); !s.ok()) return s;
  for (int seq : seqs) cache_->AdvanceToken(seq);
  Logits(0, n, logits);
  return policy_.method == CacheMethod::kLoma ? CompressSegments(seqs) : absl::OkStatus();
}

template <typename T>
absl::Status PagedDecoder<T>::CanStep(const std::vector<int>& seqs) const {
  if (policy_.method != CacheMethod::kLoma) return cache_->CanStep(seqs);
  const kernels::LomaZones& z = model_.config().loma.zones;
  long pages = 0;
  for (int seq : seqs)
    pages += cache_->PagesForTokens(seq, (cache_->tokens(seq) + 1) % z.segment() ? 1 : 1 + z.t);
  if (pages > cache_->allocator().free_pages())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache budget of %d bytes exhausted: the next token of %d sequences (with the t = %d "
        "memory slots of each segment it completes) may need %d new pages of %d bytes, only %d "
        "are free",
        cache_->allocator().budget_bytes(), seqs.size(), z.t, pages,
        cache_->allocator().page_bytes(), cache_->allocator().free_pages()));
  return absl::OkStatus();
}

template <typename T>
absl::Status PagedDecoder<T>::CompressSegments(const std::vector<int>& seqs) {
  const model::LlamaConfig& c = model_.config();
  const kernels::LomaZones& z = c.loma.zones;
  const int tc = z.segment();
  std::vector<int> full;
  for (int seq : seqs)
    if (cache_->tokens(seq) % tc == 0) full.push_back(seq);
  if (full.empty()) return absl::OkStatus();
  // One Run over every <m> of every compressing sequence: wave m holds <m> number m of each
  // (distinct sequences), so within a sequence <m> m is cached and attends after <m> m − 1.
  const int n = static_cast<int>(full.size());
  std::vector<int> rows, positions;
  for (int m = 0; m < z.t; ++m)
    for (int seq : full) {
      const int chunk = cache_->tokens(seq) / tc - 1;  // the segment just completed
      rows.push_back(seq);
      positions.push_back(kernels::loma_position(chunk * z.chunk() + tc + m, z));
    }
  const std::vector<int32_t> memory_tokens(rows.size(), c.loma.memory_token);
  if (absl::Status s = Run(rows, positions, memory_tokens.data(), n); !s.ok()) return s;
  // Every head holds [memory | segment of tc | t new memory]: the segment goes.
  for (int seq : full)
    for (int l = 0; l < c.num_hidden_layers; ++l)
      for (int h = 0; h < c.num_key_value_heads; ++h)
        if (absl::Status s =
                cache_->Remove(seq, l, h, cache_->length(seq, l, h) - z.t - tc, tc);
            !s.ok())
          return s;
  return absl::OkStatus();
}

template <typename T>
absl::Status PagedDecoder<T>::Extend(int seq, const int32_t* tokens, int n,
                                     std::vector<T>* logits) {
  const model::LlamaConfig& c = model_.config();
  if (!cache_->contains(seq))
    return absl::NotFoundError(absl::StrFormat("sequence %d is not in the cache", seq));
  if (policy_.method == CacheMethod::kLoma)
    return absl::InvalidArgumentError(
        "the loma cache compresses each segment between two steps: feed its tokens one by one "
        "(Step)");
  const int start = cache_->tokens(seq);
  if (n < 1 || start + n > c.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrFormat(
        "a chunk of %d tokens after %d of sequence %d: it must have 1 to %d tokens "
        "(max_position_embeddings %d)",
        n, start, seq, c.max_position_embeddings - start, c.max_position_embeddings));
  for (int i = 0; i < n; ++i)
    if (absl::Status s = CheckToken(tokens[i], c.vocab_size); !s.ok()) return s;
  const long pages = cache_->PagesForTokens(seq, n);
  if (pages > cache_->allocator().free_pages())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "a chunk of %d tokens of sequence %d may need %d more KV pages; the budget has %d free",
        n, seq, pages, cache_->allocator().free_pages()));
  const std::vector<int> rows(n, seq);
  std::vector<int> positions(n);
  for (int i = 0; i < n; ++i) positions[i] = start + i;
  // One row per wave: token i's cache update and attention come after token i - 1's, as in Step.
  if (absl::Status s = Run(rows, positions, tokens, 1); !s.ok()) return s;
  for (int i = 0; i < n; ++i) cache_->AdvanceToken(seq);
  Logits(n - 1, 1, logits);
  return absl::OkStatus();
}

template <typename T>
void PagedDecoder<T>::Logits(int first, int count, std::vector<T>* logits) {
  const model::LlamaConfig& c = model_.config();
  const int C = c.hidden_size, V = c.vocab_size;
  k::rmsnorm_forward(xn_.data(), rstd_.data(), x_.data() + size_t(first) * C, model_.final_norm(),
                     count, C, c.rms_norm_eps);
  logits->resize(size_t(count) * V);
  k::matmul_forward(logits->data(), xn_.data(), model_.lm_head(), count, C, V);
}

template <typename T>
absl::Status PagedDecoder<T>::Run(const std::vector<int>& seqs, const std::vector<int>& positions,
                                  const int32_t* tokens, int wave) {
  const model::LlamaConfig& c = model_.config();
  const int C = c.hidden_size, D = c.head_dim(), H = c.num_attention_heads;
  const int Hkv = c.num_key_value_heads, F = c.intermediate_size;
  const int n = static_cast<int>(seqs.size());
  const bool dmc = c.dmc.enabled, dms = c.dms.enabled;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const k::DmcGateParams gate_params{c.dmc.init_val, c.dmc.temperature, c.dmc.omega_eps,
                                     k::DmcDecisionMode::kHard};
  const k::DmsGateParams dms_params{c.dms.scale, c.dms.offset, c.dms.temperature,
                                    k::DmcDecisionMode::kHard};
  const bool qchannel = dms && c.dms.variant == model::DmsVariant::kQueryChannel;
  const bool evicts = policy_.method == CacheMethod::kH2O || policy_.method == CacheMethod::kTova;
  const bool quantized = KvQuantized(cache_->options()), think = KvThink(cache_->options());
  const bool salient = policy_.quant.salient_slots > 0;  // ZipCache scores every slot
  for (auto* b : {&x_, &xn_, &o_, &x2_}) b->resize(size_t(n) * C);
  for (auto* b : {&q_, &qr_, &att_}) b->resize(size_t(n) * H * D);
  for (auto* b : {&k_, &v_, &kr_}) b->resize(size_t(n) * Hkv * D);
  for (auto* b : {&gate_, &up_, &h_}) b->resize(size_t(n) * F);
  for (auto* b : {&logit_, &alpha_, &merge_, &mask_, &omega_, &dms_x_}) b->resize(size_t(n) * Hkv);
  rstd_.resize(n);

  k::embedding_forward(x_.data(), tokens, model_.embedding(), n, C);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const auto w = model_.layer(l);
    k::rmsnorm_forward(xn_.data(), rstd_.data(), x_.data(), w.attn_norm, n, C, c.rms_norm_eps);
    k::matmul_forward(q_.data(), xn_.data(), w.wq, n, C, H * D);
    k::matmul_forward(k_.data(), xn_.data(), w.wk, n, C, Hkv * D);
    k::matmul_forward(v_.data(), xn_.data(), w.wv, n, C, Hkv * D);
    if (dmc)  // hard decisions and importances of these tokens, from the control channels
      k::dmc_gates_forward<T>({logit_.data(), alpha_.data(), merge_.data(), mask_.data(),
                               omega_.data()},
                              q_.data(), k_.data(), nullptr, n, 1, H, Hkv, D, gate_params);
    if (dms) {  // hard eviction decisions of these tokens
      dms_xn_.resize(size_t(n) * C);
      dms_rstd_.resize(n);
      model_.DmsDecisionInput(l, x_.data(), q_.data(), dms_x_.data(), n, dms_rstd_.data(),
                              dms_xn_.data());
      if (qchannel) model::ZeroDmsQueryChannel(q_.data(), n, H, Hkv, D);
      k::dms_gates_forward<T>(logit_.data(), alpha_.data(), merge_.data(), nullptr,
                              dms_x_.data(), nullptr, n, 1, Hkv, dms_params);
    }
    for (int i = 0; i < n; ++i)
      k::rope_forward(qr_.data() + size_t(i) * H * D, q_.data() + size_t(i) * H * D, 1, 1, H, D,
                      positions[i], c.rope_theta, dmc);
    if (qchannel) model::ZeroDmsQueryChannel(qr_.data(), n, H, Hkv, D);
    const int source = KvSourceLayer(policy_, l);  // KVSharer: a shared layer reads another's
    // The rows of a wave update the cache together, then attend to it.
    for (int r0 = 0; r0 < n; r0 += wave) {
      const int m = std::min(wave, n - r0);
      const std::vector<int> rows(seqs.begin() + r0, seqs.begin() + r0 + m);
      if (source == l)
        if (absl::Status s = UpdateCache(rows, positions.data() + r0, r0, l); !s.ok()) return s;
      const T* q = qr_.data() + size_t(r0) * H * D;
      T* att = att_.data() + size_t(r0) * H * D;
      for (int i = 0; think && i < m; ++i)
        cache_->ObserveQuery(rows[i], l, q + size_t(i) * H * D, H, dmc);
      int max_pages = 0;
      cache_->BlockTable(rows, source, &page_table_, &lengths_, &max_pages);
      const int residual = KvResidualSlots(cache_->options());
      const int stride =
          max_pages * cache_->options().page_size + (KvSettles(cache_->options()) ? residual : 0);
      if (evicts || salient) probs_.resize(size_t(m) * H * stride);
      T* probs = evicts || salient ? probs_.data() : nullptr;
      if (KvSettles(cache_->options()))
        cache_->ResidualTable(rows, source, &residual_blocks_, &residual_lengths_);
      if (think) {
        k::paged_decode_attention_think<T>(
            att, probs, stride, q, cache_->k_pool(), cache_->v_pool(), cache_->mask_pool(),
            cache_->options().think_channels, page_table_.data(), lengths_.data(), max_pages,
            cache_->options().page_size, cache_->r_k_pool(), cache_->r_v_pool(),
            residual_blocks_.data(), residual_lengths_.data(), residual, m, H, Hkv, D, dmc,
            scale);
      } else if (quantized) {
        k::paged_decode_attention_quantized<T>(
            att, probs, stride, q, cache_->q_pool(), cache_->quant_layout(), page_table_.data(),
            lengths_.data(), max_pages, cache_->r_k_pool(), cache_->r_v_pool(),
            residual_blocks_.data(), residual_lengths_.data(), residual, m, H, Hkv, D, dmc,
            scale);
      } else {
        k::paged_decode_attention<T>(att, probs, stride, q, cache_->k_pool(), cache_->v_pool(),
                                     page_table_.data(), lengths_.data(), max_pages,
                                     cache_->options().page_size, m, H, Hkv, D, dmc, scale);
      }
      for (int i = 0; salient && i < m; ++i)
        AccumulateAttention(*cache_, rows[i], l, probs + size_t(i) * H * stride, stride, H);
      for (int i = 0; evicts && i < m; ++i) {
        const T* p = probs_.data() + size_t(i) * H * stride;
        const absl::Status s =
            policy_.method == CacheMethod::kH2O
                ? H2OUpdate(*cache_, rows[i], l, positions[r0 + i], p, stride, H, policy_)
                : TovaUpdate(*cache_, rows[i], l, p, stride, H, policy_);
        if (!s.ok()) return s;
      }
    }
    k::matmul_forward(o_.data(), att_.data(), w.wo, n, H * D, C);
    for (size_t i = 0; i < x2_.size(); ++i) x2_[i] = x_[i] + o_[i];
    model_.MlpForward(l, x2_.data(), x_.data(), n, rstd_.data(), xn_.data(), gate_.data(),
                      up_.data(), h_.data());
  }
  return absl::OkStatus();
}

template class PagedDecoder<float>;
template class PagedDecoder<double>;
template absl::StatusOr<std::vector<float>> Prefill(model::Llama<float>&, CacheMethod,
                                                    PagedKvCache<float>*, int,
                                                    const std::vector<int32_t>&);
template absl::StatusOr<std::vector<double>> Prefill(model::Llama<double>&, CacheMethod,
                                                     PagedKvCache<double>*, int,
                                                     const std::vector<int32_t>&);

}  // namespace dmc::inference
