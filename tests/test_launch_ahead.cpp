// Steps launched ahead (DecodeEngine::Launch, Collect; the scheduler's launch ahead): the
// engine's rules while a step is out, and a scheduler that launches ahead delivers exactly the
// outputs of one that does not, under admissions, prefills, preemptions, sampling, a stop and a
// cancellation, with every page returned.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <tuple>

#include "inference/cpu_engine.h"
#include "inference/scheduler.h"
#include "model/llama.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CachePolicy;
using inference::DecodeEngine;
using inference::Request;
using inference::TokenOutput;

model::LlamaConfig DmcConfig() {
  model::LlamaConfig c = tiny_models::TinyLlama(13, 2);
  c.dmc.enabled = true;
  c.dmc.window = 3;
  c.dmc.init_val = -0.5f;  // plenty of merges
  return c;
}

TEST(LaunchAhead, EngineRulesWhileAStepIsOut) {
  model::Llama<double> m(DmcConfig(), nullptr);
  tiny_models::RandomizeParams(m, 3);
  auto engine = inference::CpuEngine<double>::Create(m, CachePolicy{}, 1L << 22, 4);
  ASSERT_TRUE(engine.ok()) << engine.status();
  DecodeEngine& e = **engine;
  for (int seq : {0, 1}) ASSERT_TRUE(e.AddSequence(seq, {}).ok());
  const std::vector<int> both = {0, 1};
  const int32_t first[2] = {3, 5};
  const int32_t previous[2] = {DecodeEngine::kPreviousChoice, DecodeEngine::kPreviousChoice};
  std::vector<TokenOutput> out;
  EXPECT_TRUE(absl::IsFailedPrecondition(e.Collect(&out))) << "nothing out";
  EXPECT_TRUE(absl::IsInvalidArgument(e.Launch(both, previous, nullptr)))
      << "no step out to take a choice from";
  ASSERT_TRUE(e.Launch(both, first, nullptr).ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(e.Launch({1, 0}, previous, nullptr)))
      << "another order";
  EXPECT_TRUE(absl::IsFailedPrecondition(e.Launch({0}, previous, nullptr))) << "another batch";
  ASSERT_TRUE(e.Launch(both, previous, nullptr).ok());
  EXPECT_EQ(e.steps_out(), 2);
  EXPECT_EQ(e.tokens(0), 2) << "launched tokens count";
  EXPECT_TRUE(absl::IsFailedPrecondition(e.Launch(both, previous, nullptr))) << "two out";
  std::vector<TokenOutput> a, b;
  ASSERT_TRUE(e.Collect(&a).ok());
  ASSERT_TRUE(e.Collect(&b).ok());
  EXPECT_EQ(e.steps_out(), 0);

  // The same two steps one after the other, the second fed the first's choices.
  auto again = inference::CpuEngine<double>::Create(m, CachePolicy{}, 1L << 22, 4);
  ASSERT_TRUE(again.ok());
  for (int seq : {0, 1}) ASSERT_TRUE((*again)->AddSequence(seq, {}).ok());
  std::vector<TokenOutput> a2, b2;
  ASSERT_TRUE((*again)->Step(both, first, nullptr, &a2).ok());
  const int32_t chosen[2] = {a2[0].next, a2[1].next};
  ASSERT_TRUE((*again)->Step(both, chosen, nullptr, &b2).ok());
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(a[i].next, a2[i].next);
    EXPECT_EQ(b[i].next, b2[i].next);
    EXPECT_EQ(b[i].logprob, b2[i].logprob) << "sequence " << i;
  }
}

// Every output of a run, by (request, position), the tokens each request ends with, and how
// many it had fed when it finished.
struct Outcome {
  std::map<std::pair<int, int>, std::tuple<int32_t, double, int32_t>> outputs;
  std::vector<std::vector<int32_t>> tokens;
  std::vector<int> fed;
  std::vector<bool> cancelled;
  inference::SchedulerStats stats;
};

Outcome Decode(model::Llama<double>& m, const std::vector<Request>& requests, long budget,
           bool ahead, int stop_request, int stop_at, int cancel_request, int cancel_after) {
  auto engine = inference::CpuEngine<double>::Create(m, CachePolicy{}, budget, 2);
  EXPECT_TRUE(engine.ok()) << engine.status();
  EXPECT_TRUE((*engine)->set_launch_ahead(ahead).ok());
  inference::Scheduler scheduler(**engine, 4);
  for (const Request& r : requests) EXPECT_TRUE(scheduler.Submit(r).ok());
  Outcome run;
  run.tokens.resize(requests.size());
  run.fed.resize(requests.size());
  run.cancelled.resize(requests.size());
  int delivered_to_cancelled = 0;
  while (!scheduler.idle()) {
    const absl::Status s = scheduler.StepOnce(
        [&](int r, int pos, const TokenOutput& o) {
          run.outputs[{r, pos}] = {o.next, o.logprob, o.argmax};
          if (r == cancel_request && ++delivered_to_cancelled == cancel_after)
            scheduler.Cancel(r);
          return !(r == stop_request && pos == stop_at);
        },
        [&](int r, bool cancelled) {
          run.tokens[r] = scheduler.request(r).tokens;
          run.fed[r] = (*engine)->tokens(r);
          run.cancelled[r] = cancelled;
        });
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) break;
  }
  EXPECT_EQ((*engine)->num_sequences(), 0);
  EXPECT_EQ((*engine)->used_bytes(), 0) << "pages or window state leaked";
  EXPECT_EQ((*engine)->steps_out(), 0);
  run.stats = scheduler.stats();
  return run;
}

TEST(LaunchAhead, SchedulerDeliversWhatItDeliversWithout) {
  model::Llama<double> m(DmcConfig(), nullptr);
  tiny_models::RandomizeParams(m, 7);
  const int V = m.config().vocab_size;
  std::mt19937_64 rng(11);
  std::vector<Request> requests(9);
  for (size_t r = 0; r < requests.size(); ++r) {
    const int prompt = 3 + static_cast<int>(r % 4);
    for (int t = 0; t < prompt; ++t)
      requests[r].tokens.push_back(static_cast<int32_t>(rng() % V));
    // Every third feeds its prompt through the steps and runs long: admission counts one token
    // of it, so a tight budget preempts.
    requests[r].prefill = r % 3 != 2;
    requests[r].length = prompt + (requests[r].prefill ? 5 + static_cast<int>(r * 3 % 7) : 20);
    if (r % 2 == 1) requests[r].sampling = {0.8f, 0.9f, 100 + r};
  }
  // Request 4 stops at its 3rd generated token; request 6 is cancelled after 4 outputs.
  const int stop_request = 4, stop_at = static_cast<int>(requests[4].tokens.size()) + 2;
  const int cancel_request = 6, cancel_after = 4;
  for (long budget : {1L << 22, 6000L}) {
    SCOPED_TRACE("budget " + std::to_string(budget));
    const Outcome plain = Decode(m, requests, budget, false, stop_request, stop_at, cancel_request,
                             cancel_after);
    const Outcome ahead = Decode(m, requests, budget, true, stop_request, stop_at, cancel_request,
                             cancel_after);
    EXPECT_EQ(plain.stats.steps_ahead, 0);
    EXPECT_GT(ahead.stats.steps_ahead, ahead.stats.steps / 3)
        << "most steps go on unchanged, so most are launched ahead";
    if (budget < (1L << 22)) {
      EXPECT_GT(plain.stats.preemptions, 0) << "the test needs preemptions";
    }
    EXPECT_EQ(ahead.tokens, plain.tokens);
    EXPECT_EQ(ahead.cancelled, plain.cancelled);
    for (size_t r = 0; r < requests.size(); ++r) {
      if (static_cast<int>(r) == stop_request || static_cast<int>(r) == cancel_request) {
        // It may ride one step launched ahead before its end is known.
        EXPECT_GE(ahead.fed[r], plain.fed[r]) << "request " << r;
        EXPECT_LE(ahead.fed[r], plain.fed[r] + 1) << "request " << r;
      } else {
        EXPECT_EQ(ahead.fed[r], plain.fed[r]) << "request " << r;
      }
    }
    // The cancelled request's last outputs before its cancellation arrived may differ in number;
    // every output both runs delivered is the same.
    int compared = 0;
    for (const auto& [key, value] : plain.outputs) {
      auto it = ahead.outputs.find(key);
      if (key.first == cancel_request && it == ahead.outputs.end()) continue;
      ASSERT_NE(it, ahead.outputs.end()) << "request " << key.first << " position " << key.second;
      EXPECT_EQ(it->second, value) << "request " << key.first << " position " << key.second;
      ++compared;
    }
    EXPECT_EQ(ahead.outputs.size(), plain.outputs.size());
    EXPECT_GT(compared, 60);
    EXPECT_EQ(plain.tokens[stop_request].size(), static_cast<size_t>(stop_at + 1));
    EXPECT_TRUE(plain.cancelled[cancel_request]);
  }
}

// A server's requests arrive while the batch runs. Launching ahead must not hold them back until
// a running request ends: a waiting request the budget holds joins at the next round, and its
// prompt goes on by a chunk every round after.
TEST(LaunchAhead, ArrivalsJoinAtTheNextRound) {
  model::Llama<double> m(DmcConfig(), nullptr);
  tiny_models::RandomizeParams(m, 5);
  auto engine = inference::CpuEngine<double>::Create(m, CachePolicy{}, 1L << 22, 2);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->set_launch_ahead(true).ok());
  ASSERT_TRUE((*engine)->chunked_prefill()) << "the test needs prompts in chunks";
  const long chunk = 2;
  inference::Scheduler scheduler(**engine, 4, chunk);
  Request running{{3, 1, 4}, 40, {}, true};
  Request arriving{{2, 7, 1, 8, 2, 8}, 9, {}, true};
  const int running_id = *scheduler.Submit(running);
  std::map<int, int> finished_round;
  int round = 0;
  auto step = [&] {
    ++round;
    return scheduler.StepOnce([](int, int, const TokenOutput&) { return true; },
                              [&](int r, bool) { finished_round[r] = round; });
  };
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(step().ok());
  ASSERT_GT(scheduler.stats().steps_ahead, 0) << "the lone request's steps go ahead";
  const int arrived_at = round;
  const int arriving_id = *scheduler.Submit(arriving);
  while (!scheduler.idle()) ASSERT_TRUE(step().ok());
  // Its prompt takes 3 rounds of 2 tokens, then 3 decode rounds to its length of 9, and one
  // more while its last step is out (launch ahead delivers a step a round late).
  const int prompt_rounds = static_cast<int>((arriving.tokens.size() + chunk - 1) / chunk);
  const int decode_rounds = arriving.length - static_cast<int>(arriving.tokens.size());
  EXPECT_LE(finished_round.at(arriving_id), arrived_at + prompt_rounds + decode_rounds + 1);
  EXPECT_LT(finished_round.at(arriving_id), finished_round.at(running_id))
      << "the arrival ran beside the running request, not after it";
  EXPECT_EQ((*engine)->used_bytes(), 0);
}

}  // namespace
}  // namespace dmc
