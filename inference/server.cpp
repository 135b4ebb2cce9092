#include "inference/server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <chrono>
#include <condition_variable>
#include <ctime>
#include <mutex>
#include <utility>

#include "absl/strings/str_format.h"
#include "inference/completion.h"
#include "nlohmann/json.hpp"

namespace dmc::inference {
namespace {

using nlohmann::json;

// Generated text may hold invalid UTF-8 (a model emits any byte): it is replaced, not refused.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void SetError(httplib::Response& res, int status, const std::string& message) {
  const char* type = status == 503 ? "unavailable" : status >= 500 ? "server_error"
                                                                   : "invalid_request_error";
  res.status = status;
  res.set_content(Dump({{"error", {{"message", message}, {"type", type}, {"code", status}}}}),
                  "application/json");
}

// The OpenAI completion object (a whole answer, or one event of a stream); token_ids is ours.
json CompletionJson(const std::string& id, long created, const std::string& model,
                    const std::string& text, const std::vector<int32_t>& ids, const json& finish) {
  return {{"id", id},
          {"object", "text_completion"},
          {"created", created},
          {"model", model},
          {"choices",
           {{{"index", 0},
             {"text", text},
             {"token_ids", ids},
             {"logprobs", nullptr},
             {"finish_reason", finish}}}}};
}

// What the engine thread hands a request's HTTP handler; the handler waits on cv (WakeTarget)
// under mu.
struct Channel : WakeTarget {
  Channel(const data::Tokenizer& tokenizer, std::vector<std::string> stop)
      : text(tokenizer, std::move(stop)) {}
  std::mutex mu;
  CompletionText text;
  bool finished = false;
  FinishReason reason = FinishReason::kLength;
  std::string error;
  size_t sent_tokens = 0;  // token ids already streamed
  int64_t handle = 0;
};

// OpenAI's finish_reason: "stop" (EOS or a stop string), "length", or ours for the rest.
std::string FinishName(const Channel& ch) {
  if (ch.text.stopped()) return "stop";
  return FinishReasonName(ch.reason);
}

}  // namespace

std::string PrometheusText(const ServeMetrics& m) {
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, double value) {
    absl::StrAppendFormat(&out, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type,
                          name, value);
  };
  metric("dmc_serve_running_sequences", "gauge", "Sequences in the running batch.", m.running);
  metric("dmc_serve_waiting_requests", "gauge", "Accepted requests waiting to run.", m.waiting);
  metric("dmc_serve_kv_used_bytes", "gauge", "KV cache bytes in use.", m.kv_used_bytes);
  metric("dmc_serve_kv_free_bytes", "gauge", "KV cache bytes free under the budget.",
         m.kv_budget_bytes - m.kv_used_bytes);
  metric("dmc_serve_kv_budget_bytes", "gauge", "KV cache budget.", m.kv_budget_bytes);
  metric("dmc_serve_kv_peak_bytes", "gauge", "Most KV cache bytes in use at once.", m.kv_peak_bytes);
  metric("dmc_serve_achieved_cr", "gauge",
         "Compression ratio of finished sequences: tokens over cache slots, all heads.",
         m.achieved_cr());
  metric("dmc_serve_max_concurrent_sequences", "gauge", "Most sequences in one decode step.",
         m.max_concurrent);
  metric("dmc_serve_generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens);
  metric("dmc_serve_tokens_per_second", "gauge",
         "Tokens generated per second of engine work (prefill and steps).",
         m.busy_seconds > 0 ? m.generated_tokens / m.busy_seconds : 0.0);
  absl::StrAppendFormat(&out,
                        "# HELP dmc_serve_time_to_first_token_seconds Acceptance to first token.\n"
                        "# TYPE dmc_serve_time_to_first_token_seconds summary\n"
                        "dmc_serve_time_to_first_token_seconds_sum %.17g\n"
                        "dmc_serve_time_to_first_token_seconds_count %d\n",
                        m.ttft_seconds_sum, m.ttft_count);
  out += "# HELP dmc_serve_round_seconds Wall time of a scheduler round: the prompts' parallel "
         "prefills it admits (prefill=\"true\" when there were any), then one decode step.\n"
         "# TYPE dmc_serve_round_seconds histogram\n";
  for (const auto& [prefill, h] : {std::pair{"false", &m.decode_rounds},
                                   std::pair{"true", &m.prefill_rounds}}) {
    for (size_t i = 0; i < RoundHistogram::kBounds.size(); ++i)
      absl::StrAppendFormat(&out, "dmc_serve_round_seconds_bucket{prefill=\"%s\",le=\"%g\"} %d\n",
                            prefill, RoundHistogram::kBounds[i], h->at_most[i]);
    absl::StrAppendFormat(&out,
                          "dmc_serve_round_seconds_bucket{prefill=\"%s\",le=\"+Inf\"} %d\n"
                          "dmc_serve_round_seconds_sum{prefill=\"%s\"} %.17g\n"
                          "dmc_serve_round_seconds_count{prefill=\"%s\"} %d\n",
                          prefill, h->count, prefill, h->sum, prefill, h->count);
  }
  out += "# HELP dmc_serve_requests_finished_total Requests ended, by reason.\n"
         "# TYPE dmc_serve_requests_finished_total counter\n";
  for (const auto& [reason, n] : m.finished)
    absl::StrAppendFormat(&out, "dmc_serve_requests_finished_total{reason=\"%s\"} %d\n", reason, n);
  return out;
}

CompletionServer::CompletionServer(ServeEngineLoop& loop, const data::Tokenizer& tokenizer,
                                   ModelLimits limits, ServerOptions options)
    : loop_(loop),
      tokenizer_(tokenizer),
      limits_(limits),
      options_(std::move(options)),
      http_(std::make_unique<httplib::Server>()),
      waker_(std::make_shared<StreamWaker>()),
      started_(static_cast<long>(std::time(nullptr))) {
  const int threads = options_.threads;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http_->set_payload_max_length(options_.max_body_bytes);
  http_->set_keep_alive_timeout(1);  // idle connections must not hold up a shutdown
  http_->set_socket_options([this](int sock) {
    httplib::default_socket_options(sock);
    listen_socket_ = sock;
  });
  Routes();
}

CompletionServer::~CompletionServer() = default;

absl::StatusOr<int> CompletionServer::Bind() {
  const int port = options_.port == 0 ? http_->bind_to_any_port(options_.host)
                                      : (http_->bind_to_port(options_.host, options_.port)
                                             ? options_.port
                                             : -1);
  if (port < 0)
    return absl::UnavailableError(
        absl::StrFormat("cannot listen on %s:%d", options_.host, options_.port));
  // cpp-httplib listens with a backlog of 5: a burst of clients (a load test's) would overflow
  // it and see dropped connections. Listening again on the socket only raises the backlog.
  if (listen_socket_ >= 0) ::listen(listen_socket_, SOMAXCONN);
  return port;
}

void CompletionServer::Listen() { http_->listen_after_bind(); }

void CompletionServer::Stop() {
  // Once httplib's listening socket is closed, a stream's writer quits at its next turn, between
  // two writes, without the final event or the chunked body's end: the streams end first. (A
  // client that stops reading holds this up for httplib's write timeout at most.)
  {
    std::unique_lock<std::mutex> lock(streams_mu_);
    streams_closed_.wait(lock, [this] { return open_streams_ == 0; });
  }
  http_->stop();
}

void CompletionServer::OpenStream() {
  std::lock_guard<std::mutex> lock(streams_mu_);
  ++open_streams_;
}

void CompletionServer::CloseStream() {
  std::lock_guard<std::mutex> lock(streams_mu_);
  if (--open_streams_ == 0) streams_closed_.notify_all();
}

void CompletionServer::Routes() {
  http_->set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;  // a handler's own JSON error
    if (res.status == 404)
      SetError(res, 404, "no route " + req.method + " " + req.path);
    else if (res.status == 413)
      SetError(res, 413, absl::StrFormat("the body is larger than the limit of %d bytes",
                                         options_.max_body_bytes));
    else
      SetError(res, res.status, absl::StrFormat("HTTP %d", res.status));
  });
  http_->set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "internal error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        SetError(res, 500, what);
      });

  http_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_) return SetError(res, 503, "the server is shutting down");
    res.set_content(Dump({{"status", "ok"}}), "application/json");
  });
  // The model's length limit as vLLM reports it: prompt and completion together.
  http_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    const json model = {{"id", options_.model_name},     {"object", "model"},
                        {"created", started_},          {"owned_by", "dmc"},
                        {"max_model_len", limits_.context}};
    res.set_content(Dump({{"object", "list"}, {"data", json::array({model})}}), "application/json");
  });
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(PrometheusText(loop_.metrics()), "text/plain; version=0.0.4");
  });
  http_->Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    if (draining_) return SetError(res, 503, "the server is shutting down");
    absl::StatusOr<CompletionRequest> parsed = ParseCompletionRequest(req.body, tokenizer_, limits_);
    if (!parsed.ok()) return SetError(res, 400, std::string(parsed.status().message()));
    const CompletionRequest& r = *parsed;
    auto ch = std::make_shared<Channel>(tokenizer_, r.stop);
    ServeJob job;
    job.request.tokens = r.prompt;
    // The text's length is prompt + max_tokens; its last token is chosen, never fed.
    job.request.length = static_cast<int>(r.prompt.size()) + r.max_tokens - 1;
    job.request.sampling = r.sampling;
    job.request.prefill = true;
    // The waker is shared with the job: it outlives the server while the loop holds the job.
    job.on_token = [ch, waker = waker_](const TokenOutput& out) {
      bool go_on;
      {
        std::lock_guard<std::mutex> lock(ch->mu);
        go_on = ch->text.Add(out.next);
      }
      waker->Wake(ch);
      return go_on;
    };
    job.on_finish = [ch](FinishReason reason, const std::string& error) {
      std::lock_guard<std::mutex> lock(ch->mu);
      ch->finished = true;
      ch->reason = reason;
      ch->error = error;
      ch->cv.notify_all();
    };
    // Open before the loop can accept the job: every job the loop takes, Stop waits for.
    if (r.stream) OpenStream();
    absl::StatusOr<int64_t> handle = loop_.Submit(std::move(job));
    if (!handle.ok()) {
      if (r.stream) CloseStream();
      return SetError(res, 503, std::string(handle.status().message()));
    }
    {
      std::lock_guard<std::mutex> lock(ch->mu);
      ch->handle = *handle;
    }
    const std::string id = absl::StrFormat("cmpl-%d", next_id_++);
    const long created = static_cast<long>(std::time(nullptr));
    const int prompt_tokens = static_cast<int>(r.prompt.size());

    if (!r.stream) {
      std::unique_lock<std::mutex> lock(ch->mu);
      ch->cv.wait(lock, [&] { return ch->finished; });
      if (ch->reason == FinishReason::kError) return SetError(res, 500, ch->error);
      if (ch->reason == FinishReason::kShutdown)
        return SetError(res, 503, "the server shut down before the completion finished");
      const int n = static_cast<int>(ch->text.tokens().size());
      json whole = CompletionJson(id, created, options_.model_name, ch->text.Release(true),
                                  ch->text.tokens(), FinishName(*ch));
      whole["usage"] = {{"prompt_tokens", prompt_tokens},
                        {"completion_tokens", n},
                        {"total_tokens", prompt_tokens + n}};
      res.set_content(Dump(whole), "application/json");
      return;
    }

    auto event = [=](const std::string& text, const std::vector<int32_t>& ids,
                     const json& finish) {
      return "data: " + Dump(CompletionJson(id, created, options_.model_name, text, ids, finish)) +
             "\n\n";
    };
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, ch, event](size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> lock(ch->mu);
          // Wakes for tokens and the end; the timeout only bounds how late a silent disconnect
          // (a request still waiting to run) is noticed.
          ch->cv.wait_for(lock, std::chrono::milliseconds(100), [&] {
            return ch->finished || ch->text.tokens().size() > ch->sent_tokens;
          });
          const bool finished = ch->finished;
          const std::string text = ch->text.Release(finished);
          const std::vector<int32_t> ids(ch->text.tokens().begin() + ch->sent_tokens,
                                         ch->text.tokens().end());
          ch->sent_tokens = ch->text.tokens().size();
          const bool failed = finished && ch->reason == FinishReason::kError;
          const std::string finish = finished ? FinishName(*ch) : "", error = ch->error;
          const int64_t handle = ch->handle;
          lock.unlock();  // the JSON is made without the lock the engine thread takes per token
          std::string out;
          if (!finished && (!text.empty() || !ids.empty())) out = event(text, ids, nullptr);
          if (finished) {
            if (failed)
              out = "data: " +
                    Dump({{"error", {{"message", error}, {"type", "server_error"},
                                     {"code", 500}}}}) +
                    "\n\n";
            else
              out = event(text, ids, finish);
            out += "data: [DONE]\n\n";
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) {
            loop_.Cancel(handle);  // the client went away: free its pages
            return false;
          }
          if (finished) {
            sink.done();
            return true;
          }
          if (!sink.is_writable()) {
            loop_.Cancel(handle);
            return false;
          }
          return true;
        },
        [this, ch](bool success) {  // as httplib destroys the response, after its last write
          if (!success) loop_.Cancel(ch->handle);
          CloseStream();
        });
  });
}

}  // namespace dmc::inference
