// Continuous batching over the paged KV cache: many requests decode together, one token each per
// step; a finished request frees its pages at once and a waiting one is admitted in its place, so
// a compressed cache (smaller per-sequence footprint) turns into more concurrent sequences.
//
// Admission: requests enter in order while fewer than max_batch run and the cache admits them.
// Preemption: when the next step's worst-case growth does not fit the budget, the most recently
// admitted request is freed and queued again at the front; it is recomputed from its tokens
// later (decoding is deterministic, and logits of a position are reported only once, so callers
// never see the recomputation). A request that does not fit even alone is an error.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/paged_decoder.h"

namespace dmc::inference {

struct Request {
  // The prompt (or a whole evaluation window); generated tokens are appended to it.
  std::vector<int32_t> tokens;
  int length = 0;  // positions to run in all, >= tokens.size()
};

// The logits [V] of position pos of request r. Returns the token of position pos + 1 when that
// one is to be generated (pos + 1 >= tokens.size() and < length), kStopRequest to end the request
// there; the value is ignored otherwise.
constexpr int32_t kStopRequest = -1;
template <typename T>
using LogitsFn = std::function<int32_t(int request, int pos, const T* logits)>;
// Called once per request, before its cache is freed (to read its per-head lengths).
using FinishFn = std::function<void(int request)>;

struct SchedulerStats {
  long steps = 0;
  long tokens = 0;         // tokens fed, recomputation included
  long preemptions = 0;
  int max_concurrent = 0;  // most sequences in one step
  double seconds = 0;      // wall time of the run
};

// Runs requests[r] as cache sequence r, to completion; max_batch >= 1.
template <typename T>
absl::StatusOr<SchedulerStats> RunBatched(PagedDecoder<T>& decoder, std::vector<Request>& requests,
                                          int max_batch, const LogitsFn<T>& on_logits,
                                          const FinishFn& on_finish);

}  // namespace dmc::inference
