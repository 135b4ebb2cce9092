// The pure parts of dmc-serve-load: the request mix's lengths, and the figures of a run over the
// window in which the server was saturated.
//
// Saturated window: the load generator samples the server's /metrics every ~50 ms as
// (seconds since the run began, running sequences, waiting requests). The server is saturated
// while a request waits for admission: the window runs from the first sample with waiting > 0 to
// the last one, leaving out the samples before the run's first decode step delivered (the first
// stream event after a stream's first): until then the server only prefills the prompts that
// arrived together at the start, which a steady load would not. Over the window:
//   tokens/s     = tokens of the stream events that arrived inside the window / window seconds
//   mean batch   = mean of `running` over the samples inside the window
//   per-token    = gap of each stream event that arrived inside the window: the seconds since the
//                  stream's previous event over the event's tokens (the first event has none; it
//                  is time to first token)
// These leave out what whole-run figures mix in: the start-up burst of prefills before anything
// waits, and the drain of the last requests at small batches after the queue has emptied.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dmc::inference {

// Lengths drawn uniformly from [least, most] (equal: one length for every request).
struct LengthRange {
  int least = 1, most = 1;
};

// "N" or "A:B" with 1 <= A <= B; anything else is refused with a message quoting it.
absl::StatusOr<LengthRange> ParseLengthRange(std::string_view text);
// The same as a flag type (ABSL_FLAG(LengthRange, ...)): absl refuses a bad value by the flag's name.
bool AbslParseFlag(absl::string_view text, LengthRange* range, std::string* error);
std::string AbslUnparseFlag(const LengthRange& range);

// Request `request`'s length, uniform in the range: a pure function of (seed, stream, request),
// so a run's mix is reproducible; distinct streams give independent draws for distinct flags.
int DrawLength(const LengthRange& range, uint64_t seed, uint64_t stream, uint64_t request);

// One reading of the server's /metrics gauges.
struct ServerSample {
  double seconds = 0;  // since the run began
  double running = 0, waiting = 0;
  double kv_used_share = -1;  // KV bytes in use over the budget; -1 when the server gave none
};

// [begin, end] in seconds since the run began, both ends included.
struct TimeWindow {
  double begin = 0, end = 0;
  bool Contains(double seconds) const { return seconds >= begin && seconds <= end; }
  double seconds() const { return end - begin; }
};

// From the first sample with waiting > 0 to the last, of the samples at or after
// `decoding_from` (seconds); none when no such sample had a waiting request.
std::optional<TimeWindow> SaturatedWindow(const std::vector<ServerSample>& samples,
                                          double decoding_from);

// Means over the samples inside the window: running sequences (0 when no sample is inside), and
// the KV budget's share in use (over the samples that have it; -1 when none does). Requests
// waited all through the window, so a share well below 1 says that something other than the
// budget (max_batch, the prefill budget, the admission itself) held the batch down.
struct WindowMeans {
  double running = 0;
  double kv_used_share = -1;
};
WindowMeans MeansInWindow(const std::vector<ServerSample>& samples, const TimeWindow& window);

// A stream event that carried tokens: when it arrived (seconds since the run began), how many.
struct TokenEvent {
  double seconds = 0;
  int tokens = 0;
};

// Tokens and per-token gaps of streams' events inside a window, summed over the streams added.
struct WindowTokens {
  long tokens = 0;
  std::vector<double> gaps;  // seconds per token, one per event after a stream's first

  // Adds one stream's events, in order of arrival.
  void AddStream(const std::vector<TokenEvent>& events, const TimeWindow& window);
};

// One series of a Prometheus histogram in the server's /metrics text: the cumulative count at
// each finite bound, in order, then every observation's count and their sum.
struct MetricHistogram {
  std::vector<double> bounds;
  std::vector<long> at_most;
  long count = 0;
  double sum = 0;
  double mean() const { return count > 0 ? sum / count : 0; }
  // The least bound with at least a fraction q of the observations at or under it: an upper
  // bound of the q-quantile (+infinity past the last bound, 0 with no observations).
  double QuantileBound(double q) const;
};

// The series of histogram `name` whose labels, before le, are `labels` (e.g. prefill="true"):
// its name_bucket{labels,le="..."}, name_count{labels} and name_sum{labels} lines. None when a
// line is missing or does not parse.
std::optional<MetricHistogram> ReadHistogram(absl::string_view metrics, absl::string_view name,
                                             absl::string_view labels);

}  // namespace dmc::inference
