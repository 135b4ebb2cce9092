#include "inference/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_format.h"

namespace dmc::inference {

absl::StatusOr<int> Scheduler::Submit(Request request) {
  const model::LlamaConfig& c = engine_.config();
  const int n = static_cast<int>(request.tokens.size());
  if (n == 0 || request.length < 1 || request.length > c.max_position_embeddings ||
      (request.prefill && request.length < n))
    return absl::InvalidArgumentError(absl::StrFormat(
        "a request needs at least one token and a length from 1 (from its %d tokens when it is "
        "prefilled) to max_position_embeddings %d, got length %d",
        n, c.max_position_embeddings, request.length));
  for (int32_t t : request.tokens)
    if (t < 0 || t >= c.vocab_size)
      return absl::InvalidArgumentError(
          absl::StrFormat("token id %d is outside the vocabulary [0, %d)", t, c.vocab_size));
  if (max_batch_ < 1)
    return absl::InvalidArgumentError(absl::StrFormat("max_batch must be >= 1, got %d", max_batch_));
  const int id = next_id_++;
  requests_[id] = Entry{std::move(request)};
  pending_.push_back(id);
  return id;
}

void Scheduler::Cancel(int id) {
  auto it = requests_.find(id);
  if (it != requests_.end()) it->second.cancelled = true;
}

bool Scheduler::Deliver(int id, int pos, const TokenOutput& out, const TokenFn& on_token) {
  Entry& e = requests_.at(id);
  Request& q = e.request;
  if (pos < e.reported) return true;  // recomputed after a preemption
  e.reported = pos + 1;
  const bool go_on = on_token(id, pos, out);
  if (pos + 1 >= static_cast<int>(q.tokens.size()) && pos + 1 < q.length) {
    if (go_on)
      q.tokens.push_back(out.next);
    else
      q.length = pos + 1;
  }
  return pos + 1 < q.length;
}

absl::Status Scheduler::Finish(int id, bool cancelled, const FinishFn& on_finish) {
  on_finish(id, cancelled);
  absl::Status s = engine_.contains(id) ? engine_.Free(id) : absl::OkStatus();
  requests_.erase(id);
  return s;
}

long Scheduler::CacheHeads() const {
  const PagedCacheOptions& o = engine_.cache_options();
  return static_cast<long>(o.layers) * o.kv_heads;
}

long Scheduler::GrowthPages(int id) const {
  const long tokens = engine_.tokens(id);
  if (tokens == 0) return CacheHeads();  // not fed yet: a page per head
  return (engine_.slots(id) + tokens - 1) / tokens;  // heads × kept fraction, rounded up
}

double Scheduler::KeptFraction() const {
  const long heads = CacheHeads();
  long slots = 0, head_tokens = 0;
  for (const std::vector<int>* ids : {&active_, &prefilling_})
    for (int id : *ids) {
      slots += engine_.slots(id);
      head_tokens += heads * engine_.tokens(id);
    }
  return head_tokens > 0 ? std::min(1.0, static_cast<double>(slots) / head_tokens) : 1.0;
}

long Scheduler::PromptPages(const Entry& e, long tokens, double kept_fraction) const {
  const PagedCacheOptions& o = engine_.cache_options();
  const long heads = CacheHeads();
  auto worst = [&](long n) { return heads * ((n + o.page_size - 1) / o.page_size); };
  if (!engine_.chunked_prefill() || e.refused) return worst(tokens);
  // A chunk (or piece) takes the worst case while it goes in, and keeps its kept fraction after:
  // the most a prompt then holds is the rest at the running sequences' fraction (and a
  // part-filled last page a head) beside one chunk at worst.
  long chunk = std::min(tokens, prompt_piece_tokens_);
  if (prefill_tokens_per_step_ > 0) chunk = std::min(chunk, prefill_tokens_per_step_);
  const long expected =
      static_cast<long>(std::ceil(kept_fraction * heads * (tokens - chunk) / o.page_size)) + heads;
  return std::min(worst(tokens), worst(chunk) + expected);
}

long Scheduler::RunningGrowthPages(double kept_fraction) const {
  long growth_pages = 0;
  for (int id : active_) growth_pages += GrowthPages(id);
  for (int id : prefilling_) {
    const Entry& e = requests_.at(id);
    growth_pages += GrowthPages(id) +
                    PromptPages(e, static_cast<long>(e.request.tokens.size()) - engine_.tokens(id),
                                kept_fraction);
  }
  return growth_pages;
}

bool Scheduler::Affordable(const Entry& e, long running_growth_pages, double kept_fraction) const {
  const PagedCacheOptions& o = engine_.cache_options();
  const long heads = CacheHeads();
  const long page = KvPageBytes(o, engine_.element_bytes());
  const long prompt_pages =
      e.request.prefill
          ? PromptPages(e, static_cast<long>(e.request.tokens.size()), kept_fraction)
          : heads;
  const long need = KvReservedBytes(o, engine_.element_bytes(), engine_.state_element_bytes()) +
                    page * (prompt_pages + heads /* the new request's first step */ +
                            running_growth_pages);
  return engine_.budget_bytes() - engine_.used_bytes() >= need;
}

absl::Status Scheduler::Preempt(int id) {
  if (absl::Status s = engine_.Free(id); !s.ok()) return s;
  pending_.push_front(id);
  ++stats_.preemptions;
  return absl::OkStatus();
}

absl::Status Scheduler::PrefillTokens(int id, long from, long n, TokenOutput* out) {
  const std::vector<int32_t>& tokens = requests_.at(id).request.tokens;
  auto feed = [&](long at, long count) {
    return engine_.Prefill(
        id, std::vector<int32_t>(tokens.begin() + at, tokens.begin() + at + count), -1, out);
  };
  const absl::Status whole = feed(from, n);
  if (!absl::IsResourceExhausted(whole) || n <= prompt_piece_tokens_ || !engine_.chunked_prefill())
    return whole;
  ++stats_.pieced_prompts;
  for (long done = 0; done < n; done += prompt_piece_tokens_)
    if (absl::Status s = feed(from + done, std::min(prompt_piece_tokens_, n - done)); !s.ok())
      return s;
  return absl::OkStatus();
}

absl::StatusOr<bool> Scheduler::PrefillChunk(int id, long budget_left, const TokenFn& on_token,
                                             const FinishFn& on_finish) {
  Entry& e = requests_.at(id);
  const std::vector<int32_t>& tokens = e.request.tokens;
  const long P = static_cast<long>(tokens.size()), fed = engine_.tokens(id);
  const long n = std::min(P - fed, budget_left);
  TokenOutput out;  // of the chunk's last position (the prompt's: its next token is not known yet)
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = PrefillTokens(id, fed, n, &out);
  stats_.prefill_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!s.ok()) return s;
  stats_.tokens += n;
  stats_.prefill_tokens += n;
  prefilled_this_step_ += n;
  if (fed + n < P) return false;
  if (!Deliver(id, static_cast<int>(P) - 1, out, on_token)) {
    if (absl::Status f = Finish(id, false, on_finish); !f.ok()) return f;
    return false;
  }
  return true;
}

absl::Status Scheduler::Admit(const TokenFn& on_token, const FinishFn& on_finish) {
  // Both taken before this round's admissions, the reserve grown as requests join.
  const double kept_fraction = KeptFraction();
  long growth_pages = RunningGrowthPages(kept_fraction);
  const bool decoding = !active_.empty();
  const bool chunking = prefill_tokens_per_step_ > 0 && engine_.chunked_prefill();
  const long budget = prefill_tokens_per_step_;
  prefilled_this_step_ = 0;
  // The prompts under way first, in admission order: each goes on by a chunk of what is left.
  std::vector<int> under_way;
  under_way.swap(prefilling_);
  for (size_t i = 0; i < under_way.size(); ++i) {
    const int id = under_way[i];
    if (prefilled_this_step_ >= budget) {
      prefilling_.push_back(id);
      continue;
    }
    absl::StatusOr<bool> done = PrefillChunk(id, budget - prefilled_this_step_, on_token, on_finish);
    if (!done.ok()) {
      if (!absl::IsResourceExhausted(done.status()) || (active_.empty() && i == 0))
        return done.status();
      // No room for its next chunk now: this and the later ones start again when there is.
      requests_.at(id).refused = true;
      ++stats_.refused_prompts;
      for (size_t j = under_way.size(); j-- > i;)
        if (absl::Status s = Preempt(under_way[j]); !s.ok()) return s;
      return absl::OkStatus();
    }
    if (*done)
      active_.push_back(id);
    else if (requests_.count(id) > 0)
      prefilling_.push_back(id);
  }
  while (static_cast<int>(active_.size() + prefilling_.size()) < max_batch_ && !pending_.empty()) {
    const int id = pending_.front();
    Entry& e = requests_.at(id);
    if (e.cancelled) {
      pending_.pop_front();
      if (absl::Status s = Finish(id, true, on_finish); !s.ok()) return s;
      continue;
    }
    const bool others = !active_.empty() || !prefilling_.empty();
    if (others && !Affordable(e, growth_pages, kept_fraction))
      break;  // wait for memory to free
    const bool parallel = e.request.prefill && engine_.parallel_prefill();
    const long P = static_cast<long>(e.request.tokens.size());
    if (parallel && chunking && prefilled_this_step_ >= budget) break;
    if (parallel && !chunking && decoding && budget > 0 && prefilled_this_step_ > 0 &&
        prefilled_this_step_ + P > budget)
      break;  // the running sequences have waited long enough: next step first
    if (absl::Status s = engine_.AddSequence(id, e.request.sampling); !s.ok()) {
      if (absl::IsResourceExhausted(s) && others) break;  // wait for memory to free
      return s;
    }
    pending_.pop_front();
    if (parallel) {
      absl::StatusOr<bool> done = PrefillChunk(
          id, chunking ? budget - prefilled_this_step_ : P, on_token, on_finish);
      if (!done.ok()) {
        if (absl::Status f = engine_.Free(id); !f.ok()) return f;
        pending_.push_front(id);
        if (absl::IsResourceExhausted(done.status()) && others) {
          e.refused = true;
          ++stats_.refused_prompts;
          break;
        }
        return done.status();
      }
      if (!*done) {
        if (requests_.count(id) > 0) {  // the rest of its prompt in the next steps
          prefilling_.push_back(id);
          growth_pages += GrowthPages(id) + PromptPages(e, P - engine_.tokens(id), kept_fraction);
        }
        continue;
      }
    }
    active_.push_back(id);
    growth_pages += GrowthPages(id);
  }
  return absl::OkStatus();
}

absl::Status Scheduler::StepOnce(const TokenFn& on_token, const FinishFn& on_finish) {
  const auto round_start = std::chrono::steady_clock::now();
  const double prefill_before = stats_.prefill_seconds;
  if (!out_.empty()) {
    // The step launched last round: when the batch goes on as it is, the next step is launched
    // before this one's outputs are delivered, so the device runs it meanwhile.
    absl::StatusOr<bool> ahead = LaunchAhead();
    if (!ahead.ok()) return ahead.status();
    if (absl::Status s = CollectStep(on_token, on_finish); !s.ok()) return s;
    if (*ahead) return EndRound(round_start, prefill_before);
  }
  // Cancelled requests leave first, so their pages serve this step's admissions.
  for (std::vector<int>* ids : {&active_, &prefilling_}) {
    std::vector<int> kept;
    for (int id : *ids)
      if (requests_.at(id).cancelled) {
        if (absl::Status s = Finish(id, true, on_finish); !s.ok()) return s;
      } else {
        kept.push_back(id);
      }
    ids->swap(kept);
  }
  if (absl::Status s = Admit(on_token, on_finish); !s.ok()) return s;
  if (active_.empty()) return EndRound(round_start, prefill_before);

  // Preemption frees the most recently admitted first: prompts under way, then running ones.
  absl::Status fits = engine_.CanStep(active_);
  while (!fits.ok() && !prefilling_.empty()) {
    if (absl::Status s = Preempt(prefilling_.back()); !s.ok()) return s;
    prefilling_.pop_back();
    fits = engine_.CanStep(active_);
  }
  while (!fits.ok() && active_.size() > 1) {
    if (absl::Status s = Preempt(active_.back()); !s.ok()) return s;
    active_.pop_back();
    fits = engine_.CanStep(active_);
  }
  if (!fits.ok())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "request %d does not fit the KV cache even alone at position %d: %s", active_[0],
        engine_.tokens(active_[0]), fits.message()));
  if (absl::Status s = LaunchStep(); !s.ok()) return s;
  if (!engine_.launch_ahead())
    if (absl::Status s = CollectStep(on_token, on_finish); !s.ok()) return s;
  return EndRound(round_start, prefill_before);
}

absl::Status Scheduler::LaunchStep() {
  const size_t n = active_.size();
  OutStep step{active_, std::vector<int>(n), !pending_.empty()};
  std::vector<int32_t> step_tokens(n), targets(n);
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int32_t>& tokens = requests_.at(active_[i]).request.tokens;
    const int pos = engine_.tokens(active_[i]);
    step.positions[i] = pos;
    // Past the tokens known here: the choice of the step out (a step launched ahead).
    step_tokens[i] = pos < static_cast<int>(tokens.size()) ? tokens[pos]
                                                           : DecodeEngine::kPreviousChoice;
    targets[i] = pos + 1 < static_cast<int>(tokens.size()) ? tokens[pos + 1] : -1;
  }
  const auto start = std::chrono::steady_clock::now();
  absl::Status launched = engine_.Launch(active_, step_tokens.data(), targets.data());
  stats_.step_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!launched.ok()) return launched;
  out_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::StatusOr<bool> Scheduler::LaunchAhead() {
  if (!engine_.launch_ahead() || out_.size() != 1) return false;
  // Every request of the step out goes on after it, none cancelled, and the budget holds the
  // next step's growth; anything else waits for this round's collection (the admissions,
  // preemptions and releases need the engine with no step out).
  // A prompt under way takes its next chunk, and a waiting request that the budget holds now
  // joins, in this round: launched ahead, they would wait until some request ends.
  if (!prefilling_.empty()) return false;
  if (!pending_.empty() && running() < max_batch_) {
    const Entry& next = requests_.at(pending_.front());
    const double kept_fraction = KeptFraction();
    if (next.cancelled ||
        Affordable(next, RunningGrowthPages(kept_fraction), kept_fraction))
      return false;
  }
  const OutStep& step = out_.front();
  for (size_t i = 0; i < step.ids.size(); ++i) {
    const Entry& e = requests_.at(step.ids[i]);
    if (e.cancelled || e.ended || step.positions[i] + 1 >= e.request.length) return false;
  }
  if (!engine_.CanStep(active_).ok()) return false;
  if (absl::Status s = LaunchStep(); !s.ok()) return s;
  ++stats_.steps_ahead;
  return true;
}

absl::Status Scheduler::CollectStep(const TokenFn& on_token, const FinishFn& on_finish) {
  OutStep step = std::move(out_.front());
  out_.pop_front();
  std::vector<TokenOutput> outs;
  const auto start = std::chrono::steady_clock::now();
  absl::Status collected = engine_.Collect(&outs);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  stats_.step_seconds += seconds;
  if (!collected.ok()) return collected;
  const size_t n = step.ids.size();
  ++stats_.steps;
  stats_.tokens += static_cast<long>(n);
  if (step.saturated) {
    ++stats_.saturated_steps;
    stats_.saturated_tokens += static_cast<long>(n);
    stats_.saturated_step_seconds += seconds;
    const double budget = static_cast<double>(engine_.budget_bytes());
    long kept = 0;
    for (int id : step.ids) kept += engine_.bytes(id);
    stats_.saturated_used_share += static_cast<double>(engine_.used_bytes()) / budget;
    stats_.saturated_kept_share += static_cast<double>(kept) / budget;
  }
  stats_.max_concurrent = std::max(stats_.max_concurrent, static_cast<int>(n));
  collected_saturated_ = step.saturated;

  // A request that ended while its next step was out rides that step; its output is dropped
  // and it finishes once no step holds it.
  std::vector<int> still;
  for (size_t i = 0; i < n; ++i) {
    const int id = step.ids[i];
    Entry& e = requests_.at(id);
    const bool riding = e.ended || e.cancelled;
    if (!riding && Deliver(id, step.positions[i], outs[i], on_token)) {
      still.push_back(id);
      continue;
    }
    if (!out_.empty()) {
      e.ended = true;
      continue;
    }
    if (absl::Status s = Finish(id, e.cancelled, on_finish); !s.ok()) return s;
  }
  if (out_.empty()) active_.swap(still);
  return absl::OkStatus();
}

absl::Status Scheduler::EndRound(std::chrono::steady_clock::time_point start,
                                 double prefill_before) {
  if (collected_saturated_)
    stats_.saturated_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() -
        (stats_.prefill_seconds - prefill_before);
  collected_saturated_ = false;
  return absl::OkStatus();
}

absl::StatusOr<SchedulerStats> RunBatched(DecodeEngine& engine, std::vector<Request>& requests,
                                          int max_batch, const TokenFn& on_token,
                                          const FinishFn& on_finish,
                                          long prefill_tokens_per_step, long prompt_piece_tokens) {
  const auto start = std::chrono::steady_clock::now();
  Scheduler scheduler(engine, max_batch, prefill_tokens_per_step, prompt_piece_tokens);
  for (size_t r = 0; r < requests.size(); ++r) {
    absl::StatusOr<int> id = scheduler.Submit(requests[r]);
    if (!id.ok()) return absl::InvalidArgumentError(absl::StrFormat("request %d: %s", r, id.status().message()));
  }
  auto finish = [&](int id, bool cancelled) {
    requests[id] = scheduler.request(id);
    on_finish(id, cancelled);
  };
  while (!scheduler.idle())
    if (absl::Status s = scheduler.StepOnce(on_token, finish); !s.ok()) return s;
  SchedulerStats stats = scheduler.stats();
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

}  // namespace dmc::inference
