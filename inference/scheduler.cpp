#include "inference/scheduler.h"

#include <chrono>

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

long Scheduler::GrowthPages(int id) const {
  const PagedCacheOptions& o = engine_.cache_options();
  const long heads = static_cast<long>(o.layers) * o.kv_heads;
  const long tokens = engine_.tokens(id);
  if (tokens == 0) return heads;  // not fed yet: a page per head
  long slots = 0;
  for (int l = 0; l < o.layers; ++l)
    for (int h = 0; h < o.kv_heads; ++h) slots += engine_.length(id, l, h);
  return (slots + tokens - 1) / tokens;  // heads × kept fraction, rounded up
}

bool Scheduler::Affordable(const Request& request, long running_growth_pages) const {
  const PagedCacheOptions& o = engine_.cache_options();
  const long heads = static_cast<long>(o.layers) * o.kv_heads;
  const long page = KvPageBytes(o, engine_.element_bytes());
  const long prompt = request.prefill ? static_cast<long>(request.tokens.size()) : 1;
  const long need = KvReservedBytes(o, engine_.element_bytes(), engine_.window_element_bytes()) +
                    heads * page * ((prompt + o.page_size - 1) / o.page_size) +
                    page * (heads /* the new request's first step */ + running_growth_pages);
  return engine_.budget_bytes() - engine_.used_bytes() >= need;
}

absl::Status Scheduler::Admit(const TokenFn& on_token, const FinishFn& on_finish) {
  // The running sequences' reserve, summed once and grown as requests join (a head loop each).
  long growth_pages = 0;
  for (int id : active_) growth_pages += GrowthPages(id);
  const bool decoding = !active_.empty();
  long prefilled = 0;  // prompt tokens prefilled by this call
  while (static_cast<int>(active_.size()) < max_batch_ && !pending_.empty()) {
    const int id = pending_.front();
    Entry& e = requests_.at(id);
    if (e.cancelled) {
      pending_.pop_front();
      if (absl::Status s = Finish(id, true, on_finish); !s.ok()) return s;
      continue;
    }
    if (!active_.empty() && !Affordable(e.request, growth_pages)) break;  // wait for memory to free
    const bool parallel = e.request.prefill && engine_.parallel_prefill();
    const long P = static_cast<long>(e.request.tokens.size());
    if (parallel && decoding && prefill_tokens_per_step_ > 0 && prefilled > 0 &&
        prefilled + P > prefill_tokens_per_step_)
      break;  // the running sequences have waited long enough: next step first
    if (absl::Status s = engine_.AddSequence(id, e.request.sampling); !s.ok()) {
      if (absl::IsResourceExhausted(s) && !active_.empty()) break;  // wait for memory to free
      return s;
    }
    const std::vector<int32_t>& tokens = e.request.tokens;
    if (parallel) {
      TokenOutput out;  // of the prompt's last position, whose next token is not known yet
      const auto start = std::chrono::steady_clock::now();
      absl::Status s = engine_.Prefill(id, tokens, -1, &out);
      stats_.prefill_seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!s.ok()) {
        if (absl::Status f = engine_.Free(id); !f.ok()) return f;
        if (absl::IsResourceExhausted(s) && !active_.empty()) break;
        return s;
      }
      stats_.tokens += P;
      stats_.prefill_tokens += P;
      prefilled += P;
      if (!Deliver(id, static_cast<int>(P) - 1, out, on_token)) {
        pending_.pop_front();
        if (absl::Status s = Finish(id, false, on_finish); !s.ok()) return s;
        continue;
      }
    }
    pending_.pop_front();
    active_.push_back(id);
    growth_pages += GrowthPages(id);
  }
  return absl::OkStatus();
}

absl::Status Scheduler::StepOnce(const TokenFn& on_token, const FinishFn& on_finish) {
  // Cancelled requests leave first, so their pages serve this step's admissions.
  std::vector<int> kept;
  for (int id : active_)
    if (requests_.at(id).cancelled) {
      if (absl::Status s = Finish(id, true, on_finish); !s.ok()) return s;
    } else {
      kept.push_back(id);
    }
  active_.swap(kept);
  if (absl::Status s = Admit(on_token, on_finish); !s.ok()) return s;
  if (active_.empty()) return absl::OkStatus();

  absl::Status fits = engine_.CanStep(active_);
  while (!fits.ok() && active_.size() > 1) {
    const int id = active_.back();
    if (absl::Status s = engine_.Free(id); !s.ok()) return s;
    active_.pop_back();
    pending_.push_front(id);
    ++stats_.preemptions;
    fits = engine_.CanStep(active_);
  }
  if (!fits.ok())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "request %d does not fit the KV cache even alone at position %d: %s", active_[0],
        engine_.tokens(active_[0]), fits.message()));

  const size_t n = active_.size();
  std::vector<int32_t> step_tokens(n), targets(n);
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int32_t>& tokens = requests_.at(active_[i]).request.tokens;
    const int pos = engine_.tokens(active_[i]);
    step_tokens[i] = tokens[pos];
    targets[i] = pos + 1 < static_cast<int>(tokens.size()) ? tokens[pos + 1] : -1;
  }
  std::vector<TokenOutput> outs;
  const auto start = std::chrono::steady_clock::now();
  absl::Status stepped = engine_.Step(active_, step_tokens.data(), targets.data(), &outs);
  stats_.step_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!stepped.ok()) return stepped;
  ++stats_.steps;
  stats_.tokens += static_cast<long>(n);
  stats_.max_concurrent = std::max(stats_.max_concurrent, static_cast<int>(n));

  std::vector<int> still;
  for (size_t i = 0; i < n; ++i) {
    const int id = active_[i];
    if (Deliver(id, engine_.tokens(id) - 1, outs[i], on_token)) {
      still.push_back(id);
    } else if (absl::Status s = Finish(id, false, on_finish); !s.ok()) {
      return s;
    }
  }
  active_.swap(still);
  return absl::OkStatus();
}

absl::StatusOr<SchedulerStats> RunBatched(DecodeEngine& engine, std::vector<Request>& requests,
                                          int max_batch, const TokenFn& on_token,
                                          const FinishFn& on_finish,
                                          long prefill_tokens_per_step) {
  const auto start = std::chrono::steady_clock::now();
  Scheduler scheduler(engine, max_batch, prefill_tokens_per_step);
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
