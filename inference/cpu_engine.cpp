#include "inference/cpu_engine.h"

#include "absl/strings/str_format.h"
#include "kernels/sample.h"

namespace dmc::inference {

template <typename T>
absl::StatusOr<std::unique_ptr<CpuEngine<T>>> CpuEngine<T>::Create(model::Llama<T>& model,
                                                             const CachePolicy& policy,
                                                             long budget_bytes, int page_size) {
  std::unique_ptr<CpuEngine<T>> engine(new CpuEngine<T>(
      model, CacheOptionsFor(model.config(), policy, budget_bytes, page_size)));
  absl::StatusOr<std::unique_ptr<PagedDecoder<T>>> decoder =
      PagedDecoder<T>::Create(model, policy, &engine->cache_);
  if (!decoder.ok()) return decoder.status();
  engine->decoder_ = *std::move(decoder);
  return engine;
}

template <typename T>
absl::Status CpuEngine<T>::AddSequence(int seq, const SamplingOptions& sampling) {
  if (absl::Status s = cache_.AddSequence(seq); !s.ok()) return s;
  sampling_[seq] = sampling;
  return absl::OkStatus();
}

template <typename T>
absl::Status CpuEngine<T>::Free(int seq) {
  sampling_.erase(seq);
  last_row_.erase(seq);
  return cache_.Free(seq);
}

template <typename T>
bool CpuEngine<T>::parallel_prefill() const {
  // inference::Prefill runs the training forward, which on a DMC model merges and on a DMS model
  // evicts: it serves the dmc and dms caches, and the vanilla one only of a model without either.
  // ZipCache's mixed precision ranks slots by each step's attention, ThinK channels by each
  // step's query: token by token.
  // KVSharer's layers read other layers' caches, which the training forward does not. LoMA
  // compresses each segment between two steps: token by token.
  if (policy().quant.salient_slots > 0 || policy().think_channels > 0 ||
      !policy().kv_source.empty())
    return false;
  return policy().method == CacheMethod::kDmc || policy().method == CacheMethod::kDms ||
         (policy().method == CacheMethod::kVanilla && !config().compression_enabled());
}

template <typename T>
void CpuEngine<T>::Choose(const std::vector<int>& seqs, const T* logits, const int32_t* targets,
                          std::vector<TokenOutput>* out) {
  const size_t n = seqs.size();
  last_row_.clear();
  for (size_t i = 0; i < n; ++i) last_row_[seqs[i]] = i;
  std::vector<float> temperature(n), top_p(n), logprob(n);
  std::vector<uint64_t> seed(n);
  std::vector<int32_t> position(n), next(n), argmax(n);
  for (size_t i = 0; i < n; ++i) {
    const SamplingOptions& s = sampling_.at(seqs[i]);
    temperature[i] = s.temperature;
    top_p[i] = s.top_p;
    seed[i] = s.seed;
    position[i] = cache_.tokens(seqs[i]);
  }
  kernels::sample_tokens(next.data(), logprob.data(), argmax.data(), logits, static_cast<int>(n),
                         config().vocab_size,
                         {temperature.data(), top_p.data(), seed.data(), position.data(), targets});
  out->resize(n);
  for (size_t i = 0; i < n; ++i) (*out)[i] = {next[i], logprob[i], argmax[i]};
}

template <typename T>
absl::Status CpuEngine<T>::Prefill(int seq, const std::vector<int32_t>& prompt, int32_t target,
                                TokenOutput* out) {
  for (int32_t t : prompt)
    if (t < 0 || t >= config().vocab_size)
      return absl::InvalidArgumentError(absl::StrFormat(
          "token id %d is outside the vocabulary [0, %d)", t, config().vocab_size));
  // Refused, not run wrong: the training forward of a DMC model merges whatever the method.
  if (!parallel_prefill())
    return absl::InvalidArgumentError(absl::StrFormat(
        "the CPU engine's prefill (whole or chunked) serves the dmc and dms caches and the "
        "vanilla cache of a model without compression, not %s here: feed the prompt token by "
        "token",
        PolicyName(policy())));
  if (cache_.contains(seq) && cache_.tokens(seq) > 0) {  // a chunk continuing the sequence
    if (absl::Status s =
            decoder_->Extend(seq, prompt.data(), static_cast<int>(prompt.size()), &logits_);
        !s.ok())
      return s;
  } else {
    absl::StatusOr<std::vector<T>> logits =
        inference::Prefill(model_, policy().method, &cache_, seq, prompt);
    if (!logits.ok()) return logits.status();
    const int V = config().vocab_size;
    logits_.assign(logits->end() - V, logits->end());
  }
  std::vector<TokenOutput> outs;
  Choose({seq}, logits_.data(), &target, &outs);
  *out = outs[0];
  return absl::OkStatus();
}

template <typename T>
absl::Status CpuEngine<T>::Step(const std::vector<int>& seqs, const int32_t* tokens,
                             const int32_t* targets, std::vector<TokenOutput>* out) {
  if (absl::Status s = decoder_->Step(seqs, tokens, &logits_); !s.ok()) return s;
  Choose(seqs, logits_.data(), targets, out);
  return absl::OkStatus();
}

template class CpuEngine<float>;
template class CpuEngine<double>;

}  // namespace dmc::inference
