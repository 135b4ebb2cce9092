// dmc-serve end to end on a tiny DMC model exported here, over loopback: greedy and seeded
// completions equal dmc-generate's, streams equal whole answers, bad input gets a 4xx JSON error
// while the server keeps serving, 64 streaming clients (some hanging up; then a mix of prompt and
// answer lengths) all get correct answers and leave no KV bytes in use, bad flags are refused by
// name, SIGTERM ends streams and exits 0. The engine thread's queue bound is checked in process.
#include <gtest/gtest.h>
#include <httplib.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"

#include "inference/cpu_engine.h"
#include "inference/load_stats.h"
#include "inference/serve_engine_loop.h"
#include "inference/server.h"
#include "nlohmann/json.hpp"
#include "tests/serve_process.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using nlohmann::json;

model::LlamaConfig ServeConfig() {
  model::LlamaConfig c = tiny_models::TinyLlama(259, 2);  // the byte tokenizer's vocabulary
  c.max_position_embeddings = 96;
  c.bos_token_id = 256;
  c.eos_token_id = 257;
  c.dmc.enabled = true;
  c.dmc.window = 4;
  return c;
}

// A tiny DMC model in Hugging Face layout, made once for the whole suite and removed at exit.
const std::string& ModelDir() {
  static serve_test::TempRoot temp("dmc_serve");
  static const std::string dir = serve_test::ExportRandomModel(ServeConfig(), 5, temp.path);
  return dir;
}

// dmc-serve on that model.
class Server : public serve_test::Server {
 public:
  explicit Server(std::vector<std::string> flags)
      : serve_test::Server(ModelDir(), std::move(flags)) {}
};

// The output of a command that must succeed.
std::string Shell(const std::string& command) {
  const serve_test::CommandRun run = serve_test::RunCommand(command);
  EXPECT_EQ(run.status, 0) << command;
  return run.out;
}

// Text as a JSON string carries it: invalid UTF-8 replaced.
std::string AsJsonText(const std::string& s) {
  return json::parse(json(s).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>();
}

json Complete(const serve_test::Server& server, const json& body, int expect_status = 200) {
  auto r = server.client().Post("/v1/completions", body.dump(), "application/json");
  EXPECT_TRUE(r);
  if (!r) return {};
  EXPECT_EQ(r->status, expect_status) << r->body;
  json j = json::parse(r->body, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << r->body;
  return j;
}

// The events of a streamed completion.
std::vector<std::string> StreamEvents(const Server& server, json body) {
  body["stream"] = true;
  auto r = server.client().Post("/v1/completions", body.dump(), "application/json");
  EXPECT_TRUE(r && r->status == 200);
  std::vector<std::string> events;
  if (!r) return events;
  const std::string& s = r->body;
  for (size_t at = 0, end; (end = s.find("\n\n", at)) != std::string::npos; at = end + 2) {
    EXPECT_EQ(s.compare(at, 6, "data: "), 0);
    events.push_back(s.substr(at + 6, end - at - 6));
  }
  return events;
}

TEST(Serve, CompletionsEqualDmcGenerate) {
  Server server({"--max_batch=4"});
  // The one model served, named as the completions name it, with its context.
  auto listed = server.client().Get("/v1/models");
  ASSERT_TRUE(listed && listed->status == 200);
  const json models = json::parse(listed->body);
  ASSERT_EQ(models["data"].size(), 1u) << models;
  EXPECT_EQ(models["data"][0]["max_model_len"], ServeConfig().max_position_embeddings);
  const std::string model_name = models["data"][0]["id"];
  EXPECT_EQ(Complete(server, {{"prompt", "In"}, {"max_tokens", 2}})["model"], model_name);
  for (const std::string prompt : {"And God said, ", "In the beginning"}) {
    for (const std::string sampling : {"", " --temperature=0.8 --top_p=0.9 --seed=7"}) {
      const std::string generated =
          Shell("OMP_NUM_THREADS=1 " + serve_test::InferenceBinary("dmc-generate") +
                " --model=" + ModelDir() + " --prompt='" + prompt + "' --max_new_tokens=20" +
                sampling + " 2>/dev/null");
      ASSERT_EQ(generated.rfind(prompt, 0), 0u) << generated;
      const std::string expected =
          AsJsonText(generated.substr(prompt.size(), generated.size() - prompt.size() - 1));
      json body = {{"prompt", prompt}, {"max_tokens", 20}};
      if (!sampling.empty()) body.update({{"temperature", 0.8}, {"top_p", 0.9}, {"seed", 7}});
      const json r = Complete(server, body);
      const json& choice = r["choices"][0];
      EXPECT_EQ(choice["text"], expected) << prompt << sampling;
      EXPECT_EQ(r["usage"]["prompt_tokens"], prompt.size());

      // Streamed: the same text and tokens, then a final event and [DONE].
      const std::vector<std::string> events = StreamEvents(server, body);
      ASSERT_GE(events.size(), 2u);
      EXPECT_EQ(events.back(), "[DONE]");
      std::string text;
      std::vector<int32_t> ids;
      for (size_t i = 0; i + 1 < events.size(); ++i) {
        const json e = json::parse(events[i]);
        text += e["choices"][0]["text"].get<std::string>();
        for (int32_t t : e["choices"][0]["token_ids"]) ids.push_back(t);
        EXPECT_EQ(e["choices"][0]["finish_reason"].is_null(), i + 2 < events.size());
      }
      EXPECT_EQ(AsJsonText(text), expected);
      EXPECT_EQ(ids, choice["token_ids"].get<std::vector<int32_t>>());
      EXPECT_EQ(json::parse(events[events.size() - 2])["choices"][0]["finish_reason"],
                choice["finish_reason"]);

      // The prompt as token ids (the byte tokenizer: its bytes) gives the same answer.
      json by_ids = body;
      by_ids["prompt"] = std::vector<int>(prompt.begin(), prompt.end());
      EXPECT_EQ(Complete(server, by_ids)["choices"][0]["token_ids"], choice["token_ids"]);
    }
  }
  // A stop string cuts the text before it.
  const json whole = Complete(server, {{"prompt", "Blessed are "}, {"max_tokens", 20}});
  const std::vector<int32_t> ids = whole["choices"][0]["token_ids"];
  if (ids.size() >= 8 && ids[5] < 128 && ids[5] > 0) {
    const std::string stop(1, static_cast<char>(ids[5]));
    const json cut = Complete(server, {{"prompt", "Blessed are "}, {"max_tokens", 20}, {"stop", stop}});
    EXPECT_EQ(cut["choices"][0]["finish_reason"], "stop");
    EXPECT_EQ(cut["choices"][0]["text"].get<std::string>().find(stop), std::string::npos);
  }
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(Serve, BadInputGetsA4xxJsonErrorAndTheServerGoesOn) {
  Server server({"--max_body_kb=4"});
  struct Case {
    std::string body;
    int status;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"{\"prompt\": \"abc\", ", 400, "not valid JSON"},
      {"[1, 2]", 400, "JSON object"},
      {R"({"prompt": "abc", "max_tokens": "ten"})", 400, "max_tokens"},
      {R"({"prompt": "abc", "temperature": "hot"})", 400, "temperature"},
      {R"({"prompt": "abc", "stream": 1})", 400, "stream"},
      {R"({"prompt": 42})", 400, "prompt"},
      {R"({"prompt": [1, 2, 300]})", 400, "vocabulary"},
      {R"({"prompt": "abc", "colour": 3})", 400, "unknown field \"colour\""},
      {R"({"prompt": "abc", "frequency_penalty": 0.5})", 400, "penalty\" is not supported"},
      {R"({"prompt": "abc", "logprobs": 2})", 400, "\"logprobs\" is not supported"},
      {R"({"prompt": "abc", "echo": true})", 400, "\"echo\" is not supported"},
      {R"({"prompt": "abc", "logit_bias": {"5": 10}})", 400, "\"logit_bias\" is not supported"},
      {R"({"prompt": null})", 400, "prompt"},
      {R"({"prompt": "abc", "max_tokens": 0})", 400, "max_tokens"},
      {R"({"prompt": "abc", "max_tokens": -3})", 400, "max_tokens"},
      {R"({"prompt": "abc", "max_tokens": 1000})", 400, "context"},
      {R"({"prompt": "abc", "top_p": 0})", 400, "top_p"},
      {R"({"max_tokens": 4})", 400, "\"prompt\" is required"},
      {R"({"prompt": ""})", 400, "empty"},
      {json({{"prompt", std::string(100, 'a')}}).dump(), 400, "no room"},
      {json({{"prompt", std::string(90, 'a')}, {"max_tokens", 10}}).dump(), 400, "exceed"},
      {json({{"prompt", std::string(10000, 'a')}}).dump(), 413, "limit of 4096 bytes"},
  };
  for (const Case& k : cases) {
    // A client each: a 413 may close the connection.
    auto r = server.client().Post("/v1/completions", k.body, "application/json");
    ASSERT_TRUE(r) << k.body.substr(0, 80);
    EXPECT_EQ(r->status, k.status) << k.body.substr(0, 80) << " -> " << r->body;
    const json e = json::parse(r->body, nullptr, false);
    ASSERT_FALSE(e.is_discarded()) << r->body;
    EXPECT_NE(e["error"]["message"].get<std::string>().find(k.says), std::string::npos)
        << k.body.substr(0, 80) << " -> " << r->body;
  }
  auto r = server.client().Get("/v2/nothing");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  EXPECT_NE(json::parse(r->body)["error"]["message"].get<std::string>().find("/v2/nothing"),
            std::string::npos);
  // Still serving; OpenAI's other fields at their neutral values and nulls change nothing.
  const json plain = Complete(server, {{"prompt", "abc"}, {"max_tokens", 3}});
  EXPECT_EQ(plain["choices"][0]["token_ids"].size(), 3u);
  const json neutral = Complete(
      server, json::parse(R"({"prompt": "abc", "max_tokens": 3, "frequency_penalty": 0,
          "presence_penalty": 0, "best_of": 1, "logit_bias": {}, "echo": false, "logprobs": null,
          "suffix": null, "temperature": null, "top_p": null, "seed": null, "stop": null,
          "stream": null, "n": 1, "user": null})"));
  EXPECT_EQ(neutral["choices"][0]["token_ids"], plain["choices"][0]["token_ids"]) << neutral;
  EXPECT_EQ(server.Terminate(), 0);
}

// dmc-serve-load against `server`: `clients` clients sending `requests` requests with `args`;
// its output, and how many completed and hung up by its summary line.
struct LoadRun {
  std::string out;
  int completed = 0, disconnected = 0;
};
LoadRun RunLoad(Server& server, int clients, int requests, const std::string& args) {
  LoadRun run;
  run.out = Shell(serve_test::InferenceBinary("dmc-serve-load") + " --port=" +
                  std::to_string(server.port()) + " --clients=" + std::to_string(clients) +
                  " --requests=" + std::to_string(requests) + " " + args);
  std::fprintf(stderr, "%s", run.out.c_str());
  const std::string summary = "dmc-serve-load: " + std::to_string(requests) + " requests from " +
                              std::to_string(clients) + " clients in %*f s: %d completed, %d";
  EXPECT_EQ(std::sscanf(run.out.c_str(), summary.c_str(), &run.completed, &run.disconnected), 2)
      << run.out;
  EXPECT_EQ(run.completed + run.disconnected, requests) << run.out;
  EXPECT_NE(run.out.find("0 rejected (503), 0 failed"), std::string::npos) << run.out;
  // The saturated line: figures, or why there are none (whether a 50 ms sample catches the queue
  // depends on timing).
  EXPECT_NE(run.out.find("\nsaturated"), std::string::npos) << run.out;
  // The server's rounds with and without a prefill, read back from its /metrics histogram.
  EXPECT_NE(run.out.find("\nrounds: "), std::string::npos) << run.out;
  EXPECT_EQ(run.out.find("no dmc_serve_round_seconds"), std::string::npos) << run.out;
  return run;
}

TEST(Serve, SixtyFourStreamingClientsSomeHangingUp) {
  // A budget for a few full sequences only, so requests wait and are preempted under load. The
  // queue holds every request: a client that hung up may send its next request before the server
  // has noticed, so 64 clients can briefly have 65 outstanding (the bound has its own test,
  // ServeEngineLoop.QueueBoundAndShutdownEndEveryJob).
  Server server({"--max_batch=16", "--max_queue=128", "--kv_budget_mb=0.2"});
  // Every request completed or hung up (one meant to hang up may finish first), none failed.
  const LoadRun run = RunLoad(server, 64, 128, "--max_tokens=24 --disconnect_every=4 --timeout_s=60");
  EXPECT_GE(run.disconnected, 1) << run.out;
  auto m = server.client().Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("\ndmc_serve_kv_used_bytes 0\n"), std::string::npos) << m->body;
  EXPECT_NE(m->body.find("\ndmc_serve_running_sequences 0\n"), std::string::npos) << m->body;
  EXPECT_NE(m->body.find("dmc_serve_achieved_cr"), std::string::npos);
  EXPECT_EQ(server.Terminate(), 0);
}

TEST(Serve, StreamingClientsOnAMixOfPromptAndAnswerLengths) {
  // Each request draws its prompt's and its answer's length; every distinct request is checked
  // against its own reference completion.
  Server server({"--max_batch=8", "--max_queue=64", "--kv_budget_mb=0.2"});
  RunLoad(server, 32, 64,
          "--prompt_tokens=4:40 --max_tokens=4:40 --disconnect_every=8 --seed=3 --timeout_s=60");
  EXPECT_EQ(server.Terminate(), 0);
}

// A model whose embedding is padded past its tokenizer (the byte tokenizer's 259 ids, 300 rows,
// as a random benchmark model or a checkpoint with vocab_size rounded up): a prompt of token ids
// may use every row the model has; past them is refused, and dmc-serve-load reports the server's
// message, not just the status.
TEST(Serve, PromptIdsMayUseEveryEmbeddingRowOfAPaddedVocabulary) {
  model::LlamaConfig c = ServeConfig();
  c.vocab_size = 300;
  serve_test::TempRoot temp("dmc_serve_padded");
  serve_test::Server server(serve_test::ExportRandomModel(c, 6, temp.path), {});
  const json ok = Complete(server, {{"prompt", {1, 280, 299}}, {"max_tokens", 4}});
  EXPECT_EQ(ok["choices"][0]["token_ids"].size(), 4u) << ok;
  const json bad = Complete(server, {{"prompt", {1, 300}}, {"max_tokens", 4}}, 400);
  EXPECT_NE(bad.dump().find("outside the vocabulary [0, 300)"), std::string::npos) << bad;
  const std::string load = serve_test::InferenceBinary("dmc-serve-load") +
                           " --port=" + std::to_string(server.port()) +
                           " --clients=2 --requests=2 --prompt_tokens=8 --vocab=100000 --check=false 2>&1";
  const serve_test::CommandRun run = serve_test::RunCommand(load);
  EXPECT_NE(run.status, 0) << run.out;
  EXPECT_NE(run.out.find("status 400: "), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("outside the vocabulary [0, 300)"), std::string::npos) << run.out;
  EXPECT_EQ(server.Terminate(), 0);
}

// Bad flags of the server and of its load generator: exit status 1 and a message naming the
// flag, before anything listens or connects.
TEST(Serve, BadFlagsAreRefusedByName) {
  const std::string serve =
      serve_test::InferenceBinary("dmc-serve") + " --model=" + ModelDir() + " --port=0";
  const std::string load = serve_test::InferenceBinary("dmc-serve-load") + " --port=1";
  for (const auto& [tool, flag] : std::vector<std::pair<std::string, std::string>>{
           {serve, "--max_batch=0"},
           {serve, "--prefill_tokens_per_step=-1"},
           {serve, "--page_size=0"},
           {serve, "--kv_budget_mb=0.001"},  // less than one sequence of the whole context
           {load, "--max_tokens=5:2"},
           {load, "--max_tokens=0"},
           {load, "--prompt_tokens=abc"},
           {load, "--prompt_tokens=0"},
           {load, "--prompt_tokens=0:8"}}) {
    const serve_test::CommandRun run = serve_test::RunCommand(tool + " " + flag + " 2>&1");
    EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 1) << flag << ": " << run.out;
    const std::string name = flag.substr(2, flag.find('=') - 2);  // absl names it without --
    EXPECT_NE(run.out.find(name), std::string::npos) << flag << ": " << run.out;
  }
}

TEST(Serve, SigtermEndsAStreamWithAFinalEventAndExitsZero) {
  Server server({});
  serve_test::ExpectSigtermEndsAStreamAndExitsZero(server, 90);
}

TEST(ServeEngineLoop, QueueBoundAndShutdownEndEveryJob) {
  model::Llama<float> m(ServeConfig(), nullptr);
  tiny_models::RandomizeParams(m, 5);
  auto engine = inference::CpuEngine<float>::Create(m, {inference::CacheMethod::kDmc}, 1 << 20, 16);
  ASSERT_TRUE(engine.ok()) << engine.status();
  int ended = 0;
  {
    inference::ServeEngineLoop loop(**engine, 2, 3);  // not started: every job waits
    for (int i = 0; i < 4; ++i) {
      inference::ServeJob job;
      job.request.tokens = {1, 2, 3};
      job.request.length = 8;
      job.on_token = [](const inference::TokenOutput&) { return true; };
      job.on_finish = [&](inference::FinishReason r, const std::string&) {
        EXPECT_EQ(r, inference::FinishReason::kShutdown);
        ++ended;
      };
      absl::StatusOr<int64_t> h = loop.Submit(std::move(job));
      if (i < 3) {
        EXPECT_TRUE(h.ok()) << h.status();
      } else {
        EXPECT_TRUE(absl::IsUnavailable(h.status())) << h.status();
        EXPECT_NE(h.status().message().find("at capacity"), std::string::npos);
      }
    }
    EXPECT_EQ(loop.metrics().waiting, 3);
    loop.Shutdown();
    EXPECT_TRUE(absl::IsUnavailable(loop.Submit({}).status()));
  }
  EXPECT_EQ(ended, 3);
  EXPECT_EQ((*engine)->used_bytes(), 0);
}

// The engine thread's rounds land in the histogram of those that prefilled or of those that did
// not, and /metrics says so in text that dmc-serve-load reads back to the same counts.
TEST(ServeEngineLoop, RoundsWithAndWithoutAPrefillAreCountedApart) {
  model::Llama<float> m(ServeConfig(), nullptr);
  tiny_models::RandomizeParams(m, 5);
  auto engine = inference::CpuEngine<float>::Create(m, {inference::CacheMethod::kDmc}, 1 << 20, 16);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->parallel_prefill());
  inference::ServeEngineLoop loop(**engine, 4, 8);
  loop.Start();
  std::mutex mu;
  std::condition_variable cv;
  int ended = 0;
  for (int i = 0; i < 3; ++i) {
    inference::ServeJob job;
    job.request.tokens = {1, 2, 3, 4, 5};
    job.request.length = 5 + 8;
    job.request.prefill = true;
    job.on_token = [](const inference::TokenOutput&) { return true; };
    job.on_finish = [&](inference::FinishReason r, const std::string& error) {
      EXPECT_EQ(r, inference::FinishReason::kLength) << error;
      std::lock_guard<std::mutex> lock(mu);
      ++ended;
      cv.notify_all();
    };
    ASSERT_TRUE(loop.Submit(std::move(job)).ok());
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return ended == 3; });
  }
  loop.Shutdown();
  const inference::ServeMetrics metrics = loop.metrics();
  // Every job's prompt went in a round that prefilled; its 8 further tokens need 7 more
  // rounds at least, which did not.
  EXPECT_GE(metrics.prefill_rounds.count, 1);
  EXPECT_LE(metrics.prefill_rounds.count, 3);
  EXPECT_GE(metrics.decode_rounds.count, 7);
  const std::string text = inference::PrometheusText(metrics);
  for (const auto& [labels, want] :
       {std::pair{"prefill=\"false\"", &metrics.decode_rounds},
        std::pair{"prefill=\"true\"", &metrics.prefill_rounds}}) {
    const std::optional<inference::MetricHistogram> got =
        inference::ReadHistogram(text, "dmc_serve_round_seconds", labels);
    ASSERT_TRUE(got.has_value()) << labels << "\n" << text;
    EXPECT_EQ(got->count, want->count) << labels;
    EXPECT_DOUBLE_EQ(got->sum, want->sum) << labels;
    EXPECT_EQ(got->bounds, std::vector<double>(inference::RoundHistogram::kBounds.begin(),
                                               inference::RoundHistogram::kBounds.end()));
    EXPECT_EQ(got->at_most, std::vector<long>(want->at_most.begin(), want->at_most.end()));
    EXPECT_TRUE(std::is_sorted(got->at_most.begin(), got->at_most.end())) << labels;
    EXPECT_LE(got->at_most.back(), got->count) << labels;
    EXPECT_NE(text.find(absl::StrFormat("dmc_serve_round_seconds_bucket{%s,le=\"+Inf\"} %d\n",
                                        labels, want->count)),
              std::string::npos)
        << text;
  }
}

}  // namespace
}  // namespace dmc
