// dmc-serve-load --port=P [--clients=64] [--requests=128] [--max_tokens=32]
// [--disconnect_every=4]: a bounded load generator for dmc-serve. Many concurrent streaming
// clients (their own HTTP connections) send completions; every K-th one hangs up mid-stream.
// It checks that each completed stream is whole and equal to a reference completion of the same
// prompt asked alone first (outputs do not depend on the batch), that the server ends idle with
// no KV bytes in use, and prints requests/s, tokens/s, time to first token and per-token latency
// (p50/p99) and the most sequences the server decoded at once. Exit status 1 on any failure.
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, host, "127.0.0.1", "the server's address");
ABSL_FLAG(int, port, 8000, "the server's port");
ABSL_FLAG(int, clients, 64, "concurrent streaming clients");
ABSL_FLAG(int, requests, 0, "requests in all (0: 2 per client)");
ABSL_FLAG(int, max_tokens, 32, "max_tokens of every request");
ABSL_FLAG(int, prompt_tokens, 0,
          "0: the built-in text prompts; N: as many prompts of N token ids each (pseudo-random ids "
          "below --vocab, fixed per prompt), for long-context load");
ABSL_FLAG(int, vocab, 256, "with --prompt_tokens: token ids are drawn below this");
ABSL_FLAG(double, temperature, 0.0, "temperature of every request (seeded: still checkable)");
ABSL_FLAG(uint64_t, seed, 0, "seed of every request");
ABSL_FLAG(int, disconnect_every, 0, "every K-th request hangs up mid-stream (0: none)");
ABSL_FLAG(int, disconnect_after, 2, "...after this many events with tokens");
ABSL_FLAG(bool, check, true, "compare completed streams with a reference completion each");
ABSL_FLAG(int, timeout_s, 60, "the whole run's bound; past it: failure");

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

const std::vector<std::string> kPrompts = {
    "And God said, ", "In the beginning", "The LORD is my shepherd; ", "Then Jonah prayed ",
    "And Ruth said, ", "Blessed are ", "Now it came to pass", "A soft answer ",
};

struct Outcome {
  bool completed = false, disconnected = false, rejected = false;
  std::string error;  // non-empty: a failure
  std::string text;
  std::vector<int32_t> ids;
  double ttft = -1;
  std::vector<double> token_gaps;  // seconds per token, event by event
};

// The prompts the clients cycle through: the texts, or token-id lists of --prompt_tokens ids.
std::vector<json> Prompts() {
  std::vector<json> prompts;
  const int n = absl::GetFlag(FLAGS_prompt_tokens);
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    if (n <= 0) {
      prompts.push_back(kPrompts[i]);
      continue;
    }
    std::mt19937 rng(static_cast<uint32_t>(i));
    std::vector<int32_t> ids(n);
    for (int32_t& id : ids) id = static_cast<int32_t>(rng() % absl::GetFlag(FLAGS_vocab));
    prompts.push_back(ids);
  }
  return prompts;
}

json Body(const json& prompt, bool stream) {
  return {{"prompt", prompt}, {"max_tokens", absl::GetFlag(FLAGS_max_tokens)},
          {"temperature", absl::GetFlag(FLAGS_temperature)}, {"seed", absl::GetFlag(FLAGS_seed)},
          {"stream", stream}};
}

// One streaming request; hangs up after `hang_up_after` token events when >= 0.
Outcome Stream(const json& prompt, int hang_up_after) {
  Outcome o;
  httplib::Client client(absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_port));
  client.set_read_timeout(absl::GetFlag(FLAGS_timeout_s), 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = Body(prompt, true).dump();
  req.set_header("Content-Type", "application/json");
  std::string buffer;
  bool done = false, finished = false;
  int events = 0;
  const auto start = Clock::now();
  auto last = start;
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
      const auto now = Clock::now();
      if (!ids.empty()) {
        if (o.ttft < 0) o.ttft = std::chrono::duration<double>(now - start).count();
        else
          o.token_gaps.push_back(std::chrono::duration<double>(now - last).count() / ids.size());
        last = now;
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
  else if (res.status != 200) o.error = "status " + std::to_string(res.status) + ": " + res.body;
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

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("dmc-serve-load --port=PORT [--clients=64] [--disconnect_every=4]");
  absl::ParseCommandLine(argc, argv);
  const int clients = absl::GetFlag(FLAGS_clients);
  const int total = absl::GetFlag(FLAGS_requests) > 0 ? absl::GetFlag(FLAGS_requests) : 2 * clients;
  const int every = absl::GetFlag(FLAGS_disconnect_every);
  const auto deadline = Clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s));
  httplib::Client probe(absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_port));
  probe.set_read_timeout(absl::GetFlag(FLAGS_timeout_s), 0);

  // References: each prompt alone, not streamed.
  const std::vector<json> prompts = Prompts();
  std::vector<json> reference(prompts.size());
  if (absl::GetFlag(FLAGS_check))
    for (size_t p = 0; p < prompts.size(); ++p) {
      auto res = probe.Post("/v1/completions", Body(prompts[p], false).dump(), "application/json");
      if (!res || res->status != 200) {
        std::fprintf(stderr, "dmc-serve-load: the reference request failed: %s\n",
                     res ? res->body.c_str() : httplib::to_string(res.error()).c_str());
        return 1;
      }
      reference[p] = json::parse(res->body)["choices"][0];
    }

  std::vector<Outcome> outcomes(total);
  std::atomic<int> next{0};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t)
    threads.emplace_back([&] {
      for (int i; (i = next++) < total && Clock::now() < deadline;) {
        const bool hang_up = every > 0 && i % every == every - 1;
        outcomes[i] = Stream(prompts[i % prompts.size()],
                             hang_up ? absl::GetFlag(FLAGS_disconnect_after) : -1);
      }
    });
  for (std::thread& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  int completed = 0, disconnected = 0, rejected = 0, failed = 0;
  long tokens = 0;
  std::vector<double> ttft, gaps;
  for (int i = 0; i < total; ++i) {
    Outcome& o = outcomes[i];
    const size_t p = i % prompts.size();
    if (o.completed && absl::GetFlag(FLAGS_check) &&
        (o.ids != reference[p]["token_ids"].get<std::vector<int32_t>>() ||
         o.text != reference[p]["text"].get<std::string>()))
      o.error = "the stream differs from the reference completion of its prompt";
    if (!o.completed && !o.disconnected && !o.rejected && o.error.empty())
      o.error = "not run before the deadline";
    if (!o.error.empty()) {
      if (failed++ < 5) std::fprintf(stderr, "dmc-serve-load: request %d: %s\n", i, o.error.c_str());
      continue;
    }
    completed += o.completed;
    disconnected += o.disconnected;
    rejected += o.rejected;
    tokens += static_cast<long>(o.ids.size());
    if (o.ttft >= 0) ttft.push_back(o.ttft);
    gaps.insert(gaps.end(), o.token_gaps.begin(), o.token_gaps.end());
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
              completed / seconds, tokens / seconds, 1e3 * Quantile(ttft, 0.5),
              1e3 * Quantile(ttft, 0.99), 1e3 * Quantile(gaps, 0.5), 1e3 * Quantile(gaps, 0.99),
              Gauge(metrics, "dmc_serve_max_concurrent_sequences"),
              Gauge(metrics, "dmc_serve_achieved_cr"));
  if (!idle)
    std::fprintf(stderr, "dmc-serve-load: the server did not end idle with no KV bytes used:\n%s",
                 metrics.c_str());
  if (Clock::now() > deadline) std::fprintf(stderr, "dmc-serve-load: past --timeout_s\n");
  return failed == 0 && rejected == 0 && idle && Clock::now() <= deadline ? 0 : 1;
}
