// The HTTP front end of dmc-serve (cpp-httplib): POST /v1/completions (OpenAI-style, JSON or
// server-sent events), GET /v1/models (the one model served, as OpenAI clients list models),
// GET /health, GET /metrics (Prometheus text). It only parses and prints:
// requests go to the engine thread (inference/serve_engine_loop.h) and tokens come back through
// a per-request channel. Every error is a JSON body {"error": {"message", "type", "code"}}.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "data/tokenizer.h"
#include "inference/completion.h"
#include "inference/serve_engine_loop.h"
#include "inference/stream_waker.h"

namespace httplib {
class Server;
}

namespace dmc::inference {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                      // 0: any free port (Bind returns it)
  size_t max_body_bytes = 1 << 20;
  int threads = 96;                     // connections served at once (streams hold one each)
  std::string model_name = "dmc";       // the "model" of responses
};

// The Prometheus exposition of a metrics snapshot.
std::string PrometheusText(const ServeMetrics& m);

class CompletionServer {
 public:
  // The loop and the tokenizer must outlive the server; requests are checked against `limits`.
  CompletionServer(ServeEngineLoop& loop, const data::Tokenizer& tokenizer, ModelLimits limits,
                   ServerOptions options);
  ~CompletionServer();

  // Binds the listening socket; returns the port.
  absl::StatusOr<int> Bind();
  // Serves until Stop (blocks).
  void Listen();
  // New completions get 503 from now on (the first step of a graceful shutdown).
  void Drain() { draining_ = true; }
  // Waits until every open stream has written its end, then closes the listening socket; Listen
  // returns once the handlers have finished. Called after the loop's Shutdown, which ends every
  // stream's job, so that each stream's final event and [DONE] go out.
  void Stop();

 private:
  void Routes();
  // A stream is open from before its job is submitted until httplib destroys its response,
  // after the last write.
  void OpenStream();
  void CloseStream();

  ServeEngineLoop& loop_;
  const data::Tokenizer& tokenizer_;
  const ModelLimits limits_;
  const ServerOptions options_;
  std::unique_ptr<httplib::Server> http_;
  std::shared_ptr<StreamWaker> waker_;
  std::atomic<bool> draining_{false};
  std::atomic<long> next_id_{0};
  const long started_ = 0;  // Unix time the server was made: the model's "created"
  int listen_socket_ = -1;
  std::mutex streams_mu_;
  std::condition_variable streams_closed_;
  int open_streams_ = 0;
};

}  // namespace dmc::inference
