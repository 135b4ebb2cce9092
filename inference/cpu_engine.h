// The decoding engine on the CPU (inference/decode_engine.h): the specification that the CUDA
// engine is checked against. PagedDecoder over a PagedKvCache<float>, the parallel prefill of
// inference/paged_decoder.h, and kernels::sample_tokens on the host logits.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/decode_engine.h"
#include "inference/paged_decoder.h"

namespace dmc::inference {

template <typename T>
class CpuEngine : public DecodeEngine {
 public:
  // The model (tensor-parallel size 1) must outlive the engine; its activations are overwritten
  // by Prefill.
  static absl::StatusOr<std::unique_ptr<CpuEngine>> Create(model::Llama<T>& model,
                                                           const CachePolicy& policy,
                                                           long budget_bytes, int page_size);

  const model::LlamaConfig& config() const override { return model_.config(); }
  const CachePolicy& policy() const override { return decoder_->policy(); }
  const PagedCacheOptions& cache_options() const override { return cache_.options(); }
  // Pages and window state both T (PagedKvCache<T>); static, as CudaEngine's.
  static constexpr int kElementBytes = sizeof(T);
  static constexpr int kStateElementBytes = sizeof(T);
  int element_bytes() const override { return kElementBytes; }
  int state_element_bytes() const override { return kStateElementBytes; }
  absl::Status AddSequence(int seq, const SamplingOptions& sampling) override;
  absl::Status Free(int seq) override;
  bool contains(int seq) const override { return cache_.contains(seq); }
  int num_sequences() const override { return cache_.num_sequences(); }
  int tokens(int seq) const override { return cache_.tokens(seq); }
  absl::Status CanStep(const std::vector<int>& seqs) const override {
    return decoder_->CanStep(seqs);
  }
  bool parallel_prefill() const override;
  // A chunk continues a sequence through PagedDecoder::Extend (token by token within each layer,
  // the matmuls batched over the chunk), which is Step's arithmetic, so it serves every method
  // that parallel_prefill() serves. The first chunk of an empty sequence goes through the
  // training forward (inference::Prefill), as a whole prompt does.
  bool chunked_prefill() const override { return parallel_prefill(); }
  absl::Status Prefill(int seq, const std::vector<int32_t>& prompt, int32_t target,
                       TokenOutput* out) override;
  absl::Status Step(const std::vector<int>& seqs, const int32_t* tokens, const int32_t* targets,
                    std::vector<TokenOutput>* out) override;
  int length(int seq, int layer, int h) const override { return cache_.length(seq, layer, h); }
  long bytes(int seq) const override { return cache_.bytes(seq); }
  long used_bytes() const override { return cache_.allocator().used_bytes(); }
  long peak_bytes() const override { return cache_.allocator().peak_bytes(); }

  // The logits [V] of the last position fed to `seq` by the last Step or Prefill (tests compare
  // them with the training forward).
  const T* last_logits(int seq) const {
    return logits_.data() + last_row_.at(seq) * config().vocab_size;
  }
  const PagedKvCache<T>& cache() const { return cache_; }

 private:
  CpuEngine(model::Llama<T>& model, const PagedCacheOptions& options)
      : model_(model), cache_(options) {}
  // kernels::sample_tokens over logits [seqs.size(), V], the draws at each sequence's position.
  void Choose(const std::vector<int>& seqs, const T* logits, const int32_t* targets,
              std::vector<TokenOutput>* out);

  model::Llama<T>& model_;
  PagedKvCache<T> cache_;
  std::unique_ptr<PagedDecoder<T>> decoder_;
  std::map<int, SamplingOptions> sampling_;
  std::vector<T> logits_;
  std::map<int, size_t> last_row_;  // row of logits_ of each sequence fed last time
};

}  // namespace dmc::inference
