// dmc-serve-load's pure parts (inference/load_stats.h) on hand-made inputs: the length flags'
// parsing and draws, the saturated window from /metrics samples, the tokens and per-token gaps
// of stream events inside a window, and a histogram read from /metrics text.
#include "inference/load_stats.h"

#include <gtest/gtest.h>

#include <limits>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"

namespace dmc::inference {
namespace {

TEST(LoadStats, ParsesALengthOrARange) {
  for (const auto& [text, least, most] :
       std::vector<std::tuple<std::string, int, int>>{
           {"32", 32, 32}, {"1", 1, 1}, {"512:2048", 512, 2048}, {"7:7", 7, 7}, {"007", 7, 7}}) {
    absl::StatusOr<LengthRange> r = ParseLengthRange(text);
    ASSERT_TRUE(r.ok()) << text << ": " << r.status();
    EXPECT_EQ(r->least, least) << text;
    EXPECT_EQ(r->most, most) << text;
  }
}

TEST(LoadStats, RefusesBadLengthsByQuotingThem) {
  const std::map<std::string, std::string> says = {
      {"", "at least 1"},          {"0", "at least 1"},         {"abc", "at least 1"},
      {":3", "ends must be"},      {"3:", "ends must be"},      {":", "ends must be"},
      {"0:4", "ends must be"},     {"1:2:3", "ends must be"},   {"+5", "at least 1"},
      {" 5", "at least 1"},        {"2.5", "at least 1"},       {"99999999999", "at least 1"},
      {"5:2", "lower end is above its upper end"},
  };
  for (const auto& [text, why] : says) {
    absl::StatusOr<LengthRange> r = ParseLengthRange(text);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << text;
    const std::string message(r.status().message());
    EXPECT_NE(message.find("\"" + text + "\""), std::string::npos) << message;
    EXPECT_NE(message.find(why), std::string::npos) << text << ": " << message;
  }
}

TEST(LoadStats, DrawsLengthsReproduciblyAndUniformly) {
  EXPECT_EQ(DrawLength({24, 24}, 3, 1, 17), 24);
  const LengthRange r{5, 8};
  std::map<int, int> counts;
  bool seed_matters = false, stream_matters = false;
  for (uint64_t i = 0; i < 4000; ++i) {
    const int n = DrawLength(r, 7, 1, i);
    EXPECT_EQ(n, DrawLength(r, 7, 1, i)) << "a pure function of its arguments";
    ++counts[n];
    seed_matters |= n != DrawLength(r, 8, 1, i);
    stream_matters |= n != DrawLength(r, 7, 2, i);
  }
  EXPECT_TRUE(seed_matters);
  EXPECT_TRUE(stream_matters);
  // Every length of the range and no other, each about a quarter of the draws.
  ASSERT_EQ(counts.size(), 4u);
  for (const auto& [n, count] : counts) {
    EXPECT_GE(n, 5);
    EXPECT_LE(n, 8);
    EXPECT_NEAR(count, 1000, 150) << "length " << n;
  }
}

// Running and waiting sampled every second: a queue from 2 s to 5 s, one more waiter at 7 s.
const std::vector<ServerSample> kSamples = {
    {0, 0, 0}, {1, 4, 0}, {2, 8, 3}, {3, 8, 5}, {4, 6, 0}, {5, 8, 2}, {6, 5, 0}, {7, 9, 1}, {8, 0, 0},
};

TEST(LoadStats, SaturatedWindowRunsFromTheFirstWaitingSampleToTheLast) {
  std::optional<TimeWindow> w = SaturatedWindow(kSamples, 0);
  ASSERT_TRUE(w);
  EXPECT_EQ(w->begin, 2);
  EXPECT_EQ(w->end, 7);
  EXPECT_EQ(w->seconds(), 5);
  // Running over the samples at 2..7 s: (8 + 8 + 6 + 8 + 5 + 9) / 6.
  EXPECT_DOUBLE_EQ(MeansInWindow(kSamples, *w).running, 44.0 / 6);
  EXPECT_EQ(MeansInWindow(kSamples, *w).kv_used_share, -1) << "no sample gave the KV gauges";
}

TEST(LoadStats, SaturatedWindowStartsOnceStreamsDecode) {
  std::optional<TimeWindow> w = SaturatedWindow(kSamples, 2.5);
  ASSERT_TRUE(w);
  EXPECT_EQ(w->begin, 3);
  EXPECT_EQ(w->end, 7);
  EXPECT_DOUBLE_EQ(MeansInWindow(kSamples, *w).running, 36.0 / 5);
  // Only the waiter at 7 s is left: a window of one instant.
  w = SaturatedWindow(kSamples, 6);
  ASSERT_TRUE(w);
  EXPECT_EQ(w->seconds(), 0);
  EXPECT_FALSE(SaturatedWindow(kSamples, 7.5));
}

TEST(LoadStats, NoWaitingRequestNoWindow) {
  EXPECT_FALSE(SaturatedWindow({{0, 3, 0}, {1, 4, 0}, {2, 0, 0}}, 0));
  EXPECT_FALSE(SaturatedWindow({}, 0));
  EXPECT_EQ(MeansInWindow({{0, 3, 0}}, {1, 2}).running, 0);
}

TEST(LoadStats, KvShareIsMeanOverTheWindowsSamplesThatHaveIt) {
  // The sample at 3 s has no KV gauges (an older server, a failed parse); the one at 9 s is out.
  const std::vector<ServerSample> samples = {
      {1, 4, 0, 0.2}, {2, 8, 3, 0.5}, {3, 8, 2}, {4, 8, 1, 0.9}, {9, 0, 0, 0.0}};
  const std::optional<TimeWindow> w = SaturatedWindow(samples, 0);
  ASSERT_TRUE(w);
  const WindowMeans means = MeansInWindow(samples, *w);
  EXPECT_DOUBLE_EQ(means.running, 8);
  EXPECT_DOUBLE_EQ(means.kv_used_share, (0.5 + 0.9) / 2);
}

TEST(LoadStats, CountsTheTokensAndGapsOfEventsInsideTheWindow) {
  // Stream a: first token at 1.0 s, then 1 token at 1.5 s, 2 at 2.6 s, 1 at 4.0 s.
  const std::vector<TokenEvent> a = {{1.0, 1}, {1.5, 1}, {2.6, 2}, {4.0, 1}};
  // Stream b: its first event inside the window carries tokens but ends no gap.
  const std::vector<TokenEvent> b = {{2.0, 3}, {3.5, 3}};
  const TimeWindow window{1.2, 3.0};
  WindowTokens inside;
  inside.AddStream(a, window);
  inside.AddStream(b, window);
  EXPECT_EQ(inside.tokens, 1 + 2 + 3);
  ASSERT_EQ(inside.gaps.size(), 2u);
  EXPECT_DOUBLE_EQ(inside.gaps[0], 0.5);         // 1.5 - 1.0 over 1 token
  EXPECT_DOUBLE_EQ(inside.gaps[1], 1.1 / 2);     // 2.6 - 1.5 over 2 tokens
  // The window's ends are inside it.
  WindowTokens ends;
  ends.AddStream(a, {1.5, 2.6});
  EXPECT_EQ(ends.tokens, 3);
  EXPECT_EQ(ends.gaps.size(), 2u);
  // The whole run: every token, every gap after a stream's first event.
  WindowTokens all;
  all.AddStream(a, {0, std::numeric_limits<double>::infinity()});
  all.AddStream(b, {0, std::numeric_limits<double>::infinity()});
  EXPECT_EQ(all.tokens, 5 + 6);
  ASSERT_EQ(all.gaps.size(), 4u);
  EXPECT_DOUBLE_EQ(all.gaps[2], 1.4);     // 4.0 - 2.6 over 1 token
  EXPECT_DOUBLE_EQ(all.gaps[3], 1.5 / 3);  // 3.5 - 2.0 over 3 tokens
}

TEST(LoadStats, ReadsOneSeriesOfAHistogramAndBoundsItsQuantiles) {
  const std::string text =
      "# TYPE x histogram\n"
      "x_bucket{a=\"1\",le=\"0.5\"} 2\n"
      "x_bucket{a=\"2\",le=\"0.5\"} 0\n"
      "x_bucket{a=\"1\",le=\"1\"} 5\n"
      "x_bucket{a=\"2\",le=\"1\"} 1\n"
      "x_bucket{a=\"1\",le=\"+Inf\"} 6\n"
      "x_bucket{a=\"2\",le=\"+Inf\"} 1\n"
      "x_sum{a=\"1\"} 4.5\n"
      "x_count{a=\"1\"} 6\n"
      "x_sum{a=\"2\"} 0.75\n"
      "x_count{a=\"2\"} 1\n"
      "xy_count{a=\"1\"} 99\n";
  const std::optional<MetricHistogram> one = ReadHistogram(text, "x", "a=\"1\"");
  ASSERT_TRUE(one.has_value());
  EXPECT_EQ(one->bounds, (std::vector<double>{0.5, 1.0}));
  EXPECT_EQ(one->at_most, (std::vector<long>{2, 5}));
  EXPECT_EQ(one->count, 6);
  EXPECT_DOUBLE_EQ(one->sum, 4.5);
  EXPECT_DOUBLE_EQ(one->mean(), 0.75);
  EXPECT_EQ(one->QuantileBound(1.0 / 3), 0.5);  // 2 of 6 at or under 0.5
  EXPECT_EQ(one->QuantileBound(0.5), 1.0);
  EXPECT_EQ(one->QuantileBound(5.0 / 6), 1.0);
  EXPECT_EQ(one->QuantileBound(0.99), std::numeric_limits<double>::infinity());
  const std::optional<MetricHistogram> two = ReadHistogram(text, "x", "a=\"2\"");
  ASSERT_TRUE(two.has_value());
  EXPECT_EQ(two->at_most, (std::vector<long>{0, 1}));
  EXPECT_EQ(two->count, 1);
  EXPECT_EQ(two->QuantileBound(0.99), 1.0);
  EXPECT_EQ(MetricHistogram{}.QuantileBound(0.5), 0);  // no observations
  EXPECT_FALSE(ReadHistogram(text, "x", "a=\"3\"").has_value());  // no such series
  EXPECT_FALSE(ReadHistogram(text, "z", "a=\"1\"").has_value());
  // A series without its count, or with a value that is not a number, is none.
  EXPECT_FALSE(ReadHistogram("x_sum{a=\"1\"} 1\n", "x", "a=\"1\"").has_value());
  EXPECT_FALSE(ReadHistogram("x_bucket{a=\"1\",le=\"0.5\"} two\nx_sum{a=\"1\"} 1\n"
                             "x_count{a=\"1\"} 2\n", "x", "a=\"1\"").has_value());
}

}  // namespace
}  // namespace dmc::inference
