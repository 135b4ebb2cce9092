// dmc-serve-load --port=P [--clients=64] [--requests=128] [--max_tokens=32 | A:B]
// [--prompt_tokens=N | A:B] [--disconnect_every=4]: a bounded load generator for dmc-serve. Many
// concurrent streaming clients (their own HTTP connections) send completions; every K-th one
// hangs up mid-stream. A length given as a range A:B is drawn per request (inference/load_stats.h),
// so a run can carry a realistic mix. It checks that each completed stream is whole and equal to
// a reference completion of the same request asked alone first (outputs do not depend on the
// batch), that the server ends idle with no KV bytes in use, and prints requests/s, tokens/s, time
// to first token and per-token latency (p50/p99) and the most sequences the server decoded at
// once. A second line gives tokens/s, the mean running batch and per-token latency over the
// window in which the server was saturated (requests waiting for admission), read from its
// /metrics every 50 ms. A third gives the server's rounds with and without a prompt's prefill
// (count, mean, a bound of the p99) from its dmc_serve_round_seconds histogram. Exit status 1 on
// any failure.
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "inference/load_stats.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, host, "127.0.0.1", "the server's address");
ABSL_FLAG(int, port, 8000, "the server's port");
ABSL_FLAG(int, clients, 64, "concurrent streaming clients");
ABSL_FLAG(int, requests, 0, "requests in all (0: 2 per client)");
ABSL_FLAG(dmc::inference::LengthRange, max_tokens, (dmc::inference::LengthRange{32, 32}),
          "max_tokens of every request: N, or A:B: each request draws its own, uniformly in [A, B] "
          "(from --seed and the request's index, so a run's mix is reproducible)");
ABSL_FLAG(std::optional<dmc::inference::LengthRange>, prompt_tokens, std::nullopt,
          "unset: the built-in text prompts; N: prompts of N token ids each (pseudo-random ids below "
          "--vocab, fixed per prompt), for long-context load; A:B: each request draws its "
          "prompt's length as --max_tokens=A:B does (the first ids of the same prompts)");
ABSL_FLAG(int, vocab, 256, "with --prompt_tokens: token ids are drawn below this");
ABSL_FLAG(double, temperature, 0.0, "temperature of every request (seeded: still checkable)");
ABSL_FLAG(uint64_t, seed, 0, "seed of every request, and of the lengths drawn from ranges");
ABSL_FLAG(int, disconnect_every, 0, "every K-th request hangs up mid-stream (0: none)");
ABSL_FLAG(int, disconnect_after, 2, "...after this many events with tokens");
ABSL_FLAG(bool, check, true, "compare completed streams with a reference completion each");
ABSL_FLAG(int, timeout_s, 60, "the whole run's bound; past it: failure");

namespace {

using dmc::inference::LengthRange;
using dmc::inference::ServerSample;
using dmc::inference::TimeWindow;
using dmc::inference::TokenEvent;
using dmc::inference::WindowTokens;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

const std::vector<std::string> kPrompts = {
    "And God said, ", "In the beginning", "The LORD is my shepherd; ", "Then Jonah prayed ",
    "And Ruth said, ", "Blessed are ", "Now it came to pass", "A soft answer ",
};

// Below this mean share of the KV budget in use while requests waited, the saturated window
// is said not to be bound by the budget.
constexpr double kBudgetBoundShare = 0.8;

// The /metrics poll's period: short against a run of seconds, long against a request's answer.
constexpr auto kPollPeriod = std::chrono::milliseconds(50);

// Streams of the length draws (DrawLength), one per flag, so the two lengths are independent.
enum LengthStream : uint64_t { kPromptLengths = 1, kMaxTokens = 2 };

// What one request asks: the prompt it takes (of Prompts()), the first `prompt_tokens` of its ids
// (0: the text prompt whole), and its max_tokens. Equal shapes get equal completions.
struct RequestShape {
  size_t prompt = 0;
  int prompt_tokens = 0, max_tokens = 0;
  auto key() const { return std::tie(prompt, prompt_tokens, max_tokens); }
  bool operator<(const RequestShape& o) const { return key() < o.key(); }
};

struct Outcome {
  bool completed = false, disconnected = false, rejected = false;
  std::string error;  // non-empty: a failure
  std::string text;
  std::vector<int32_t> ids;
  double ttft = -1;
  std::vector<TokenEvent> events;  // the events that carried tokens, as they arrived
};

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}


// The prompts the clients cycle through: the texts, or token-id lists of `ids` ids each (the
// longest a request draws; a shorter one takes the first ids).
std::vector<json> Prompts(int ids) {
  std::vector<json> prompts;
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    if (ids <= 0) {
      prompts.push_back(kPrompts[i]);
      continue;
    }
    std::mt19937 rng(static_cast<uint32_t>(i));
    std::vector<int32_t> prompt(ids);
    for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % absl::GetFlag(FLAGS_vocab));
    prompts.push_back(prompt);
  }
  return prompts;
}

json Body(const std::vector<json>& prompts, const RequestShape& shape, bool stream) {
  const json& whole = prompts[shape.prompt];
  const json prompt =
      shape.prompt_tokens == 0
          ? whole
          : json(std::vector<json>(whole.begin(), whole.begin() + shape.prompt_tokens));
  return {{"prompt", prompt}, {"max_tokens", shape.max_tokens},
          {"temperature", absl::GetFlag(FLAGS_temperature)}, {"seed", absl::GetFlag(FLAGS_seed)},
          {"stream", stream}};
}

// One streaming request; hangs up after `hang_up_after` token events when >= 0. Its events are
// timed from `run_start`.
Outcome Stream(const json& body, int hang_up_after, Clock::time_point run_start) {
  Outcome o;
  httplib::Client client(absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_port));
  client.set_read_timeout(absl::GetFlag(FLAGS_timeout_s), 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  std::string buffer;
  bool done = false, finished = false;
  int events = 0;
  const auto start = Clock::now();
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    buffer.append(data, n);
    for (size_t end; (end = buffer.find("\n\n")) != std::string::npos; buffer.erase(0, end + 2)) {
      const std::string line = buffer.substr(0, end);
      if (line.rfind("data: ", 0) != 0) continue;
      const std::string payload = line.substr(6);
      if (payload == "[DONE]") {
        done = true;
        continue;
      }
      const json e = json::parse(payload, nullptr, false);
      if (e.is_discarded() || !e.contains("choices")) {
        o.error = "bad event: " + payload;
        return false;
      }
      const json& c = e["choices"][0];
      const auto ids = c["token_ids"].get<std::vector<int32_t>>();
      if (!ids.empty()) {
        if (o.ttft < 0) o.ttft = SecondsSince(start);
        o.events.push_back({SecondsSince(run_start), static_cast<int>(ids.size())});
        ++events;
      }
      o.text += c["text"].get<std::string>();
      o.ids.insert(o.ids.end(), ids.begin(), ids.end());
      if (!c["finish_reason"].is_null()) {
        finished = true;
        const std::string r = c["finish_reason"];
        if (r != "length" && r != "stop") o.error = "finish_reason " + r;
      }
      if (hang_up_after >= 0 && events >= hang_up_after && !finished) {
        o.disconnected = true;
        return false;
      }
    }
    return true;
  };
  httplib::Response res;
  httplib::Error err;
  const bool ok = client.send(req, res, err);
  if (o.disconnected || !o.error.empty()) return o;
  if (res.status == 503) {
    o.rejected = true;
    return o;
  }
  if (!ok) o.error = "HTTP error: " + httplib::to_string(err);
  // an error's JSON body arrives through the content receiver, as the stream's events would
  else if (res.status != 200) o.error = "status " + std::to_string(res.status) + ": " + buffer;
  else if (!finished || !done) o.error = "the stream ended without its final event";
  o.completed = o.error.empty();
  return o;
}

double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))];
}

// A gauge of the server's /metrics; -1 when absent.
double Gauge(const std::string& metrics, const std::string& name) {
  const size_t at = metrics.find("\n" + name + " ");
  return at == std::string::npos ? -1 : std::stod(metrics.substr(at + name.size() + 2));
}

// Reads the server's running and waiting gauges every kPollPeriod until `stop`; a sample is timed
// at the middle of its request. A failed read is skipped: the clients' own checks report a server
// that stopped answering.
std::vector<ServerSample> PollMetrics(const std::atomic<bool>& stop, Clock::time_point run_start) {
  httplib::Client client(absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_port));
  client.set_read_timeout(absl::GetFlag(FLAGS_timeout_s), 0);
  std::vector<ServerSample> samples;
  while (!stop) {
    const auto asked = Clock::now();
    auto res = client.Get("/metrics");
    const double answered = SecondsSince(run_start);
    const double at = (std::chrono::duration<double>(asked - run_start).count() + answered) / 2;
    if (res && res->status == 200) {
      const double used = Gauge(res->body, "dmc_serve_kv_used_bytes"),
                   budget = Gauge(res->body, "dmc_serve_kv_budget_bytes");
      samples.push_back({at, Gauge(res->body, "dmc_serve_running_sequences"),
                         Gauge(res->body, "dmc_serve_waiting_requests"),
                         used >= 0 && budget > 0 ? used / budget : -1});
    }
    std::this_thread::sleep_until(asked + kPollPeriod);
  }
  return samples;
}

// The figures over the window in which requests waited for admission, or why there are none.
void PrintSaturated(const std::vector<ServerSample>& samples, const std::vector<Outcome>& outcomes) {
  // The first decode step's delivery: the earliest event that follows a stream's first.
  double decoding_from = std::numeric_limits<double>::infinity();
  for (const Outcome& o : outcomes)
    if (o.error.empty() && o.events.size() > 1)
      decoding_from = std::min(decoding_from, o.events[1].seconds);
  const std::optional<TimeWindow> window = dmc::inference::SaturatedWindow(samples, decoding_from);
  if (!window) {
    std::printf("saturated: the run did not saturate the server (no request waited for admission "
                "while streams were decoding, in %zu /metrics samples)\n", samples.size());
    return;
  }
  if (window->seconds() <= 0) {
    std::printf("saturated: a request waited for admission in one /metrics sample only (at %.2f "
                "s): too short a window to measure\n", window->begin);
    return;
  }
  WindowTokens inside;
  for (const Outcome& o : outcomes)
    if (o.error.empty()) inside.AddStream(o.events, *window);
  const dmc::inference::WindowMeans means = dmc::inference::MeansInWindow(samples, *window);
  std::printf("saturated (requests waiting, %.2f s from %.2f s to %.2f s): tokens/s %.0f  mean "
              "running batch %.1f  per-token latency p50 %.2f ms p99 %.2f ms  KV used %.0f%%\n",
              window->seconds(), window->begin, window->end, inside.tokens / window->seconds(),
              means.running, 1e3 * Quantile(inside.gaps, 0.5), 1e3 * Quantile(inside.gaps, 0.99),
              100 * means.kv_used_share);
  // A server whose budget binds keeps its cache nearly full while requests wait (bench_generate's
  // saturated steps: 94-96%); well below that, its rates are not those of its memory.
  if (means.kv_used_share >= 0 && means.kv_used_share < kBudgetBoundShare)
    std::printf("not budget-bound: requests waited while the KV cache was %.0f%% full on average: "
                "max_batch, the prefill budget or the admission held the batch down, not the "
                "memory\n",
                100 * means.kv_used_share);
}

// The server's scheduler rounds without and with a prompt's prefill (dmc_serve_round_seconds):
// how many, their mean and an upper bound of their p99 (the histogram's bucket), or why not.
void PrintRounds(const std::string& metrics) {
  const auto without = dmc::inference::ReadHistogram(metrics, "dmc_serve_round_seconds",
                                                     "prefill=\"false\"");
  const auto with = dmc::inference::ReadHistogram(metrics, "dmc_serve_round_seconds",
                                                  "prefill=\"true\"");
  if (!without || !with) {
    std::printf("rounds: the server's /metrics has no dmc_serve_round_seconds histogram\n");
    return;
  }
  std::printf("rounds: %ld without a prefill, mean %.2f ms, p99 <= %.1f ms; %ld with one, mean "
              "%.2f ms, p99 <= %.1f ms\n",
              without->count, 1e3 * without->mean(), 1e3 * without->QuantileBound(0.99),
              with->count, 1e3 * with->mean(), 1e3 * with->QuantileBound(0.99));
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "dmc-serve-load --port=PORT [--clients=64] [--max_tokens=N|A:B] [--prompt_tokens=N|A:B] "
      "[--disconnect_every=4]");
  absl::ParseCommandLine(argc, argv);
  const int clients = absl::GetFlag(FLAGS_clients);
  const int total = absl::GetFlag(FLAGS_requests) > 0 ? absl::GetFlag(FLAGS_requests) : 2 * clients;
  const int every = absl::GetFlag(FLAGS_disconnect_every);
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  const LengthRange max_tokens = absl::GetFlag(FLAGS_max_tokens);
  const std::optional<LengthRange> prompt_ids = absl::GetFlag(FLAGS_prompt_tokens);
  const bool text_prompts = !prompt_ids;
  const LengthRange prompt_tokens = prompt_ids.value_or(LengthRange{});

  // Every request's shape, drawn up front: the run's mix does not depend on its timing.
  const std::vector<json> prompts = Prompts(text_prompts ? 0 : prompt_tokens.most);
  std::vector<RequestShape> shapes(total);
  for (int i = 0; i < total; ++i)
    shapes[i] = {i % prompts.size(),
                 text_prompts ? 0 : dmc::inference::DrawLength(prompt_tokens, seed, kPromptLengths, i),
                 dmc::inference::DrawLength(max_tokens, seed, kMaxTokens, i)};

  const auto deadline = Clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s));
  httplib::Client probe(absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_port));
  probe.set_read_timeout(absl::GetFlag(FLAGS_timeout_s), 0);

  // References: each distinct shape alone, not streamed.
  std::map<RequestShape, json> reference;
  if (absl::GetFlag(FLAGS_check))
    for (const RequestShape& shape : shapes) {
      if (reference.count(shape)) continue;
      auto res = probe.Post("/v1/completions", Body(prompts, shape, false).dump(), "application/json");
      if (!res || res->status != 200) {
        std::fprintf(stderr, "dmc-serve-load: the reference request failed: %s\n",
                     res ? res->body.c_str() : httplib::to_string(res.error()).c_str());
        return 1;
      }
      reference[shape] = json::parse(res->body)["choices"][0];
    }

  std::vector<Outcome> outcomes(total);
  std::atomic<int> next{0};
  std::atomic<bool> load_done{false};
  const auto start = Clock::now();
  std::vector<ServerSample> samples;
  std::thread monitor([&] { samples = PollMetrics(load_done, start); });
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t)
    threads.emplace_back([&] {
      for (int i; (i = next++) < total && Clock::now() < deadline;) {
        const bool hang_up = every > 0 && i % every == every - 1;
        outcomes[i] = Stream(Body(prompts, shapes[i], true),
                             hang_up ? absl::GetFlag(FLAGS_disconnect_after) : -1, start);
      }
    });
  for (std::thread& t : threads) t.join();
  const double seconds = SecondsSince(start);
  load_done = true;
  monitor.join();

  int completed = 0, disconnected = 0, rejected = 0, failed = 0;
  const TimeWindow whole_run{0, std::numeric_limits<double>::infinity()};
  WindowTokens all;
  std::vector<double> ttft;
  for (int i = 0; i < total; ++i) {
    Outcome& o = outcomes[i];
    if (o.completed && absl::GetFlag(FLAGS_check) &&
        (o.ids != reference[shapes[i]]["token_ids"].get<std::vector<int32_t>>() ||
         o.text != reference[shapes[i]]["text"].get<std::string>()))
      o.error = "the stream differs from the reference completion of its request";
    if (!o.completed && !o.disconnected && !o.rejected && o.error.empty())
      o.error = "not run before the deadline";
    if (!o.error.empty()) {
      if (failed++ < 5) std::fprintf(stderr, "dmc-serve-load: request %d: %s\n", i, o.error.c_str());
      continue;
    }
    completed += o.completed;
    disconnected += o.disconnected;
    rejected += o.rejected;
    all.AddStream(o.events, whole_run);
    if (o.ttft >= 0) ttft.push_back(o.ttft);
  }

  // The server must end idle with every page back; it frees a hung-up request once it notices,
  // so poll, bounded by the deadline.
  std::string metrics;
  bool idle = false;
  while (!idle && Clock::now() < deadline + std::chrono::seconds(10)) {
    auto res = probe.Get("/metrics");
    if (!res || res->status != 200) break;
    metrics = res->body;
    idle = Gauge(metrics, "dmc_serve_running_sequences") == 0 &&
           Gauge(metrics, "dmc_serve_waiting_requests") == 0 &&
           Gauge(metrics, "dmc_serve_kv_used_bytes") == 0;
    if (!idle) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  std::printf("dmc-serve-load: %d requests from %d clients in %.2f s: %d completed, %d "
              "disconnected on purpose, %d rejected (503), %d failed\n",
              total, clients, seconds, completed, disconnected, rejected, failed);
  std::printf("requests/s %.1f  tokens/s %.0f  time to first token p50 %.1f ms p99 %.1f ms  "
              "per-token latency p50 %.2f ms p99 %.2f ms  max concurrent sequences %.0f  "
              "achieved CR %.2f\n",
              completed / seconds, all.tokens / seconds, 1e3 * Quantile(ttft, 0.5),
              1e3 * Quantile(ttft, 0.99), 1e3 * Quantile(all.gaps, 0.5),
              1e3 * Quantile(all.gaps, 0.99),
              Gauge(metrics, "dmc_serve_max_concurrent_sequences"),
              Gauge(metrics, "dmc_serve_achieved_cr"));
  // A client holds one request at a time, so a server that ran as many sequences as there are
  // clients may have had room for more: its batch, and every rate above, may be the load's.
  if (Gauge(metrics, "dmc_serve_max_concurrent_sequences") >= clients)
    std::printf("load-bound: all %d clients had a sequence running at once, so the clients, not "
                "the server's memory, may have bounded its batch (more --clients tells)\n",
                clients);
  PrintSaturated(samples, outcomes);
  PrintRounds(metrics);
  if (!idle)
    std::fprintf(stderr, "dmc-serve-load: the server did not end idle with no KV bytes used:\n%s",
                 metrics.c_str());
  if (Clock::now() > deadline) std::fprintf(stderr, "dmc-serve-load: past --timeout_s\n");
  return failed == 0 && rejected == 0 && idle && Clock::now() <= deadline ? 0 : 1;
}
