// The continuous-batching scheduler's own host time per decode step (inference/scheduler.h), on
// one core: RunBatched over an engine that does no work (its Step and Prefill only count tokens),
// so what is timed is the admission, the step's bookkeeping, the delivery of every row's token
// and the finishing of requests. On the GPU engine a step of the 1B shape takes ~2.5–3.5 ms
// (bench/RESULTS.md entries 28 and 31); this says how much of it the scheduler can be.
//
//   bench_scheduler [--requests=512] [--prompt=512:1024] [--generate=256:512]
//                   [--batches=48,178,305]
#include <chrono>
#include <cstdio>
#include <random>
#include <algorithm>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "inference/decode_engine.h"
#include "inference/load_stats.h"
#include "inference/scheduler.h"

ABSL_FLAG(int, requests, 512, "requests, all submitted at the start");
ABSL_FLAG(dmc::inference::LengthRange, prompt, (dmc::inference::LengthRange{512, 1024}),
          "prompt lengths, uniform in LO:HI");
ABSL_FLAG(dmc::inference::LengthRange, generate, (dmc::inference::LengthRange{256, 512}),
          "generated tokens per request, uniform in LO:HI");
ABSL_FLAG(std::vector<std::string>, batches, (std::vector<std::string>{"48", "178", "305"}),
          "max_batch values (the sequences a step carries once saturated)");

namespace {
namespace inf = dmc::inference;

// The 1B shape's cache options and an unbounded budget: the batch, not memory, bounds a step.
class NullEngine : public inf::DecodeEngine {
 public:
  NullEngine() {
    config_.num_hidden_layers = 22;
    config_.num_key_value_heads = 4;
    config_.vocab_size = 32000;
    config_.max_position_embeddings = 5120;
    options_.layers = config_.num_hidden_layers;
    options_.kv_heads = config_.num_key_value_heads;
    options_.head_dim = 64;
    options_.page_size = 16;
    options_.budget_bytes = 1L << 50;
  }
  const dmc::model::LlamaConfig& config() const override { return config_; }
  const inf::CachePolicy& policy() const override { return policy_; }
  const inf::PagedCacheOptions& cache_options() const override { return options_; }
  int element_bytes() const override { return 2; }
  int state_element_bytes() const override { return 4; }
  absl::Status AddSequence(int seq, const inf::SamplingOptions&) override {
    tokens_[seq] = 0;
    return absl::OkStatus();
  }
  absl::Status Free(int seq) override {
    tokens_.erase(seq);
    return absl::OkStatus();
  }
  bool contains(int seq) const override { return tokens_.count(seq) > 0; }
  int num_sequences() const override { return static_cast<int>(tokens_.size()); }
  int tokens(int seq) const override { return tokens_.at(seq); }
  absl::Status CanStep(const std::vector<int>&) const override { return absl::OkStatus(); }
  bool parallel_prefill() const override { return true; }
  bool chunked_prefill() const override { return false; }
  absl::Status Prefill(int seq, const std::vector<int32_t>& prompt, int32_t,
                       inf::TokenOutput* out) override {
    tokens_.at(seq) += static_cast<int>(prompt.size());
    *out = {1, 0.0f, 1};
    return absl::OkStatus();
  }
  absl::Status Step(const std::vector<int>& seqs, const int32_t*, const int32_t*,
                    std::vector<inf::TokenOutput>* out) override {
    out->assign(seqs.size(), {1, 0.0f, 1});
    for (int seq : seqs) ++tokens_.at(seq);
    return absl::OkStatus();
  }
  int length(int seq, int, int) const override { return tokens_.at(seq); }
  long slots(int seq) const override {
    return static_cast<long>(tokens_.at(seq)) * options_.layers * options_.kv_heads;
  }
  long bytes(int) const override { return 0; }
  long used_bytes() const override { return 0; }
  long peak_bytes() const override { return 0; }

 private:
  dmc::model::LlamaConfig config_;
  inf::CachePolicy policy_;
  inf::PagedCacheOptions options_;
  std::unordered_map<int, int> tokens_;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const auto [p_lo, p_hi] = absl::GetFlag(FLAGS_prompt);
  const auto [g_lo, g_hi] = absl::GetFlag(FLAGS_generate);
  std::mt19937 rng(1);
  std::vector<inf::Request> base;
  for (int i = 0; i < absl::GetFlag(FLAGS_requests); ++i) {
    inf::Request r;
    const int P = std::uniform_int_distribution<int>(p_lo, p_hi)(rng);
    const int G = std::uniform_int_distribution<int>(g_lo, g_hi)(rng);
    r.tokens.assign(P, 1);
    r.length = P + G;
    r.prefill = true;
    base.push_back(std::move(r));
  }
  std::printf("| max batch | steps | host µs per step | host µs per row and step |\n");
  std::printf("| --- | --- | --- | --- |\n");
  for (const std::string& b : absl::GetFlag(FLAGS_batches)) {
    const int batch = std::stoi(b);
    NullEngine engine;
    std::vector<inf::Request> requests = base;
    // The callbacks do what bench_generate's do per token: a clock read and a stored gap.
    std::vector<double> gaps;
    auto last = std::chrono::steady_clock::now();
    const auto start = last;
    absl::StatusOr<inf::SchedulerStats> stats = inf::RunBatched(
        engine, requests, batch,
        [&](int, int, const inf::TokenOutput&) {
          const auto now = std::chrono::steady_clock::now();
          gaps.push_back(std::chrono::duration<double, std::micro>(now - last).count());
          last = now;
          return true;
        },
        [](int, bool) {});
    if (!stats.ok()) {
      std::fprintf(stderr, "bench_scheduler: %s\n", std::string(stats.status().message()).c_str());
      return 1;
    }
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    const double per_step = us / std::max(1L, stats->steps);
    std::printf("| %d | %ld | %.1f | %.2f |\n", batch, stats->steps, per_step,
                per_step / stats->max_concurrent);
  }
  return 0;
}
