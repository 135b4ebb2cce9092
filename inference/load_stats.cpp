#include "inference/load_stats.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <string>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kernels/noise.h"

namespace dmc::inference {
namespace {

// A whole number of at least 1, its digits and nothing else (from_chars takes no sign or space).
bool ParsePositive(std::string_view text, int& value) {
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  return error == std::errc() && stop == end && value >= 1;
}

}  // namespace

absl::StatusOr<LengthRange> ParseLengthRange(std::string_view text) {
  const auto refuse = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "\"%s\" is not a length or a range of lengths (N, or A:B with 1 <= A <= B): %s",
        std::string(text), std::string(why)));
  };
  LengthRange range;
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos) {
    if (!ParsePositive(text, range.least)) return refuse("not a whole number of at least 1");
    range.most = range.least;
    return range;
  }
  if (!ParsePositive(text.substr(0, colon), range.least) ||
      !ParsePositive(text.substr(colon + 1), range.most))
    return refuse("its ends must be whole numbers of at least 1");
  if (range.least > range.most) return refuse("its lower end is above its upper end");
  return range;
}

bool AbslParseFlag(absl::string_view text, LengthRange* range, std::string* error) {
  absl::StatusOr<LengthRange> parsed = ParseLengthRange(std::string_view(text.data(), text.size()));
  if (!parsed.ok()) {
    *error = std::string(parsed.status().message());
    return false;
  }
  *range = *parsed;
  return true;
}

std::string AbslUnparseFlag(const LengthRange& range) {
  return range.least == range.most ? absl::StrCat(range.least)
                                   : absl::StrCat(range.least, ":", range.most);
}

int DrawLength(const LengthRange& range, uint64_t seed, uint64_t stream, uint64_t request) {
  // hash_uniform is in (0, 1), so the product stays below the count of lengths.
  const int lengths = range.most - range.least + 1;
  const float u = kernels::hash_uniform(seed, stream, request);
  return range.least + std::min(lengths - 1, static_cast<int>(std::floor(u * lengths)));
}

std::optional<TimeWindow> SaturatedWindow(const std::vector<ServerSample>& samples,
                                          double decoding_from) {
  std::optional<TimeWindow> window;
  for (const ServerSample& s : samples) {
    if (s.waiting <= 0 || s.seconds < decoding_from) continue;
    if (!window) window = TimeWindow{s.seconds, s.seconds};
    window->begin = std::min(window->begin, s.seconds);
    window->end = std::max(window->end, s.seconds);
  }
  return window;
}

WindowMeans MeansInWindow(const std::vector<ServerSample>& samples, const TimeWindow& window) {
  double running = 0, share = 0;
  int inside = 0, shared = 0;
  for (const ServerSample& s : samples) {
    if (!window.Contains(s.seconds)) continue;
    running += s.running;
    ++inside;
    if (s.kv_used_share >= 0) {
      share += s.kv_used_share;
      ++shared;
    }
  }
  WindowMeans means;
  if (inside > 0) means.running = running / inside;
  if (shared > 0) means.kv_used_share = share / shared;
  return means;
}

void WindowTokens::AddStream(const std::vector<TokenEvent>& events, const TimeWindow& window) {
  for (size_t k = 0; k < events.size(); ++k) {
    if (!window.Contains(events[k].seconds)) continue;
    tokens += events[k].tokens;
    if (k > 0) gaps.push_back((events[k].seconds - events[k - 1].seconds) / events[k].tokens);
  }
}

double MetricHistogram::QuantileBound(double q) const {
  if (count <= 0) return 0;
  const long need = static_cast<long>(std::ceil(q * static_cast<double>(count)));
  for (size_t i = 0; i < bounds.size(); ++i)
    if (at_most[i] >= need) return bounds[i];
  return std::numeric_limits<double>::infinity();
}

std::optional<MetricHistogram> ReadHistogram(absl::string_view metrics, absl::string_view name,
                                             absl::string_view labels) {
  const std::string bucket = absl::StrCat(name, "_bucket{", labels, ",le=\"");
  const std::string sum = absl::StrCat(name, "_sum{", labels, "} ");
  const std::string count = absl::StrCat(name, "_count{", labels, "} ");
  MetricHistogram h;
  bool has_sum = false, has_count = false;
  for (absl::string_view line : absl::StrSplit(metrics, '\n')) {
    double value = 0;
    if (absl::ConsumePrefix(&line, bucket)) {
      const size_t close = line.find("\"} ");
      if (close == absl::string_view::npos || !absl::SimpleAtod(line.substr(close + 3), &value))
        return {};
      const absl::string_view le = line.substr(0, close);
      if (le == "+Inf") continue;  // the whole count, read from name_count
      double bound = 0;
      if (!absl::SimpleAtod(le, &bound)) return {};
      h.bounds.push_back(bound);
      h.at_most.push_back(static_cast<long>(value));
    } else if (absl::ConsumePrefix(&line, sum)) {
      if (!(has_sum = absl::SimpleAtod(line, &h.sum))) return {};
    } else if (absl::ConsumePrefix(&line, count)) {
      if (!(has_count = absl::SimpleAtod(line, &value))) return {};
      h.count = static_cast<long>(value);
    }
  }
  if (!has_sum || !has_count) return {};
  return h;
}

}  // namespace dmc::inference
