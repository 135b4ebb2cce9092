#include "inference/serve_engine_loop.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"

namespace dmc::inference {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kShutdown: return "shutdown";
    case FinishReason::kError: return "error";
  }
  return "?";
}

void RoundHistogram::Add(double seconds) {
  for (size_t i = 0; i < kBounds.size(); ++i)
    if (seconds <= kBounds[i]) ++at_most[i];
  sum += seconds;
  ++count;
}

ServeEngineLoop::ServeEngineLoop(DecodeEngine& engine, int max_batch, int max_queue,
                                 long prefill_tokens_per_step)
    : engine_(engine),
      max_batch_(max_batch),
      max_queue_(max_queue),
      prefill_tokens_per_step_(prefill_tokens_per_step),
      scheduler_(std::make_unique<Scheduler>(engine, max_batch, prefill_tokens_per_step)) {
  m_.kv_budget_bytes = engine.budget_bytes();
  published_ = m_;
}

ServeEngineLoop::~ServeEngineLoop() { Shutdown(); }

void ServeEngineLoop::Start() { thread_ = std::thread([this] { Run(); }); }

absl::StatusOr<int64_t> ServeEngineLoop::Submit(ServeJob job) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (outstanding_ - published_.running >= max_queue_)
    return absl::UnavailableError(absl::StrFormat(
        "the server is at capacity: %d requests running and %d waiting (the queue holds %d); "
        "retry later",
        published_.running, outstanding_ - published_.running, max_queue_));
  const int64_t handle = next_handle_++;
  const int prompt_tokens = static_cast<int>(job.request.tokens.size());
  inbox_.push_back(Live{std::move(job), handle, std::chrono::steady_clock::now(), prompt_tokens});
  ++outstanding_;
  published_.waiting = outstanding_ - published_.running;
  wake_.notify_one();
  return handle;
}

void ServeEngineLoop::Cancel(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  cancels_.push_back(handle);
  wake_.notify_one();
}

void ServeEngineLoop::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    wake_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
  // Jobs of a loop never started end here.
  std::vector<Live> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(inbox_);
    outstanding_ -= static_cast<int>(left.size());
  }
  for (Live& l : left) l.job.on_finish(FinishReason::kShutdown, "");
}

ServeMetrics ServeEngineLoop::metrics() const {
  std::lock_guard<std::mutex> lock(mu_);
  return published_;
}

bool ServeEngineLoop::Intake() {
  std::vector<Live> jobs;
  std::vector<int64_t> cancels;
  {
    std::unique_lock<std::mutex> lock(mu_);
    wake_.wait(lock, [&] {
      return stopping_ || !inbox_.empty() || !cancels_.empty() || !scheduler_->idle();
    });
    if (stopping_) {
      // Jobs never handed to the scheduler end here too.
      jobs.swap(inbox_);
      lock.unlock();
      for (Live& l : jobs) {
        l.job.on_finish(FinishReason::kShutdown, "");
        std::lock_guard<std::mutex> relock(mu_);
        --outstanding_;
      }
      return false;
    }
    jobs.swap(inbox_);
    cancels.swap(cancels_);
  }
  for (Live& l : jobs) {
    absl::StatusOr<int> id = scheduler_->Submit(l.job.request);
    if (!id.ok()) {
      l.job.on_finish(FinishReason::kError, std::string(id.status().message()));
      ++m_.finished[FinishReasonName(FinishReason::kError)];
      std::lock_guard<std::mutex> lock(mu_);
      --outstanding_;
      continue;
    }
    ids_[l.handle] = *id;
    live_.emplace(*id, std::move(l));
  }
  for (int64_t handle : cancels) {
    auto it = ids_.find(handle);
    if (it != ids_.end()) scheduler_->Cancel(it->second);
  }
  return true;
}

void ServeEngineLoop::EndAll(FinishReason reason, const std::string& error) {
  // A step launched ahead is collected first (its outputs dropped): the engine frees nothing
  // while a step is out.
  for (std::vector<TokenOutput> dropped; engine_.steps_out() > 0;)
    if (!engine_.Collect(&dropped).ok()) break;
  for (auto& [id, l] : live_) {
    l.job.on_finish(reason, error);
    ++m_.finished[FinishReasonName(reason)];
    if (engine_.contains(id)) engine_.Free(id).IgnoreError();  // the engine stays usable
  }
  std::lock_guard<std::mutex> lock(mu_);
  outstanding_ -= static_cast<int>(live_.size());
  live_.clear();
  ids_.clear();
  reasons_.clear();
}

void ServeEngineLoop::Run() {
  const model::LlamaConfig& c = engine_.config();
  const long heads = long(c.num_hidden_layers) * c.num_key_value_heads;
  const TokenFn on_token = [&](int id, int pos, const TokenOutput& out) {
    Live& l = live_.at(id);
    // Outputs before the prompt's last position score the prompt; they are not generation.
    if (pos + 1 < l.prompt_tokens) return true;
    if (!l.first_token) {
      l.first_token = true;
      m_.ttft_seconds_sum +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - l.accepted).count();
      ++m_.ttft_count;
    }
    ++m_.generated_tokens;
    if (l.job.on_token(out)) return true;
    reasons_[id] = FinishReason::kStop;
    return false;
  };
  const FinishFn on_finish = [&](int id, bool cancelled) {
    auto it = live_.find(id);
    FinishReason reason = cancelled ? FinishReason::kCancelled : FinishReason::kLength;
    if (auto r = reasons_.find(id); r != reasons_.end()) {
      if (!cancelled) reason = r->second;
      reasons_.erase(r);
    }
    if (engine_.contains(id)) {  // the cache it reached, before the scheduler frees it
      m_.tokens_fed += long(engine_.tokens(id)) * heads;
      m_.slots += engine_.slots(id);
    }
    it->second.job.on_finish(reason, "");
    ++m_.finished[FinishReasonName(reason)];
    ids_.erase(it->second.handle);
    live_.erase(it);
    std::lock_guard<std::mutex> lock(mu_);
    --outstanding_;
  };

  while (Intake()) {
    if (scheduler_->idle()) {
      Publish();
      continue;
    }
    const double prefill_before = scheduler_->stats().prefill_seconds;
    const auto start = std::chrono::steady_clock::now();
    absl::Status s = scheduler_->StepOnce(on_token, on_finish);
    const double round =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    m_.busy_seconds += round;
    (scheduler_->stats().prefill_seconds > prefill_before ? m_.prefill_rounds : m_.decode_rounds)
        .Add(round);
    m_.max_concurrent = std::max(m_.max_concurrent, scheduler_->stats().max_concurrent);
    if (!s.ok()) {
      // A bug or a broken device: end every job with the error and start a fresh scheduler on
      // the emptied engine, so later requests are served.
      EndAll(FinishReason::kError, std::string(s.message()));
      scheduler_ = std::make_unique<Scheduler>(engine_, max_batch_, prefill_tokens_per_step_);
    }
    Publish();
  }
  EndAll(FinishReason::kShutdown, "");
  Publish();
}

void ServeEngineLoop::Publish() {
  m_.running = scheduler_->running();
  m_.kv_used_bytes = engine_.used_bytes();
  m_.kv_peak_bytes = engine_.peak_bytes();
  std::lock_guard<std::mutex> lock(mu_);
  published_ = m_;
  published_.waiting = outstanding_ - m_.running;
}

}  // namespace dmc::inference
