#include "inference/scheduler.h"

#include <algorithm>
#include <chrono>
#include <deque>

#include "absl/strings/str_format.h"

namespace dmc::inference {

template <typename T>
absl::StatusOr<SchedulerStats> RunBatched(PagedDecoder<T>& decoder, std::vector<Request>& requests,
                                          int max_batch, const LogitsFn<T>& on_logits,
                                          const FinishFn& on_finish) {
  const auto start = std::chrono::steady_clock::now();
  PagedKvCache<T>& cache = decoder.cache();
  SchedulerStats stats;
  if (max_batch < 1)
    return absl::InvalidArgumentError(absl::StrFormat("max_batch must be >= 1, got %d", max_batch));
  std::deque<int> pending;
  for (int r = 0; r < static_cast<int>(requests.size()); ++r) {
    Request& q = requests[r];
    if (q.tokens.empty() || q.length < static_cast<int>(q.tokens.size()))
      return absl::InvalidArgumentError(absl::StrFormat(
          "request %d: needs at least one token and length >= its %d tokens (length %d)", r,
          q.tokens.size(), q.length));
    pending.push_back(r);
  }
  std::vector<int> active, reported(requests.size(), 0);
  std::vector<int32_t> step_tokens;
  std::vector<T> logits;
  while (!pending.empty() || !active.empty()) {
    while (static_cast<int>(active.size()) < max_batch && !pending.empty()) {
      const int r = pending.front();
      if (absl::Status s = cache.AddSequence(r); !s.ok()) {
        if (absl::IsResourceExhausted(s) && !active.empty()) break;  // wait for memory to free
        return s;
      }
      pending.pop_front();
      active.push_back(r);
    }
    absl::Status fits = cache.CanStep(active);
    while (!fits.ok() && active.size() > 1) {
      const int r = active.back();
      if (absl::Status s = cache.Free(r); !s.ok()) return s;
      active.pop_back();
      pending.push_front(r);
      ++stats.preemptions;
      fits = cache.CanStep(active);
    }
    if (!fits.ok())
      return absl::ResourceExhaustedError(absl::StrFormat(
          "request %d does not fit the KV cache even alone at position %d: %s", active[0],
          cache.tokens(active[0]), fits.message()));

    step_tokens.resize(active.size());
    for (size_t i = 0; i < active.size(); ++i)
      step_tokens[i] = requests[active[i]].tokens[cache.tokens(active[i])];
    if (absl::Status s = decoder.Step(active, step_tokens.data(), &logits); !s.ok()) return s;
    ++stats.steps;
    stats.tokens += static_cast<long>(active.size());
    stats.max_concurrent = std::max(stats.max_concurrent, static_cast<int>(active.size()));

    const size_t row = logits.size() / active.size();
    std::vector<int> still;
    for (size_t i = 0; i < active.size(); ++i) {
      const int r = active[i];
      Request& q = requests[r];
      const int pos = cache.tokens(r) - 1;
      if (pos >= reported[r]) {
        reported[r] = pos + 1;
        const int32_t next = on_logits(r, pos, logits.data() + i * row);
        if (pos + 1 >= static_cast<int>(q.tokens.size()) && pos + 1 < q.length) {
          if (next == kStopRequest)
            q.length = pos + 1;
          else
            q.tokens.push_back(next);
        }
      }
      if (cache.tokens(r) >= q.length) {
        on_finish(r);
        if (absl::Status s = cache.Free(r); !s.ok()) return s;
      } else {
        still.push_back(r);
      }
    }
    active.swap(still);
  }
  stats.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

template absl::StatusOr<SchedulerStats> RunBatched<float>(PagedDecoder<float>&,
                                                          std::vector<Request>&, int,
                                                          const LogitsFn<float>&,
                                                          const FinishFn&);
template absl::StatusOr<SchedulerStats> RunBatched<double>(PagedDecoder<double>&,
                                                           std::vector<Request>&, int,
                                                           const LogitsFn<double>&,
                                                           const FinishFn&);

}  // namespace dmc::inference
