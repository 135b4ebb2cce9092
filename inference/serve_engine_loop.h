// The engine thread of dmc-serve: it alone owns the Scheduler and the engine (neither is
// thread-safe). HTTP handler threads hand it jobs through a mutex-protected inbox and cancel them
// by handle; it steps while there is work, sleeps on a condition variable when idle, and after
// each step publishes a metrics snapshot so that /metrics never touches the engine.
//
// Backpressure: a job is accepted while fewer than max_queue accepted jobs wait to run (running
// ones are bounded by max_batch and the cache budget); past that Submit answers Unavailable.
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/scheduler.h"

namespace dmc::inference {

// Why a job ended: its length, a stop (its on_token returned false), Cancel, the server's
// shutdown, or an engine error.
enum class FinishReason { kLength, kStop, kCancelled, kShutdown, kError };
const char* FinishReasonName(FinishReason reason);

struct ServeJob {
  Request request;  // prompt, total length (Scheduler semantics), sampling, prefill
  // Both run on the engine thread and must be quick. on_token gets each generated token (the
  // outputs at the prompt's positions before its last are not generation); false ends the job
  // with kStop.
  std::function<bool(const TokenOutput& out)> on_token;
  std::function<void(FinishReason reason, const std::string& error)> on_finish;
};

// Wall times of the engine thread's scheduler rounds, as a Prometheus histogram: at_most[i]
// rounds took at most kBounds[i] seconds (cumulative, as Prometheus buckets are).
struct RoundHistogram {
  static constexpr std::array<double, 16> kBounds = {0.001, 0.002, 0.003, 0.005, 0.0075, 0.01,
                                                     0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                                                     0.2, 0.5, 1.0, 2.0};
  std::array<long, kBounds.size()> at_most{};
  double sum = 0;  // seconds, over count rounds
  long count = 0;
  void Add(double seconds);
};

struct ServeMetrics {
  int running = 0;              // sequences in the batch
  int waiting = 0;              // accepted jobs not running yet
  long kv_used_bytes = 0;
  long kv_budget_bytes = 0;
  long kv_peak_bytes = 0;
  int max_concurrent = 0;       // most sequences in one step so far
  long generated_tokens = 0;    // tokens handed to on_token
  long tokens_fed = 0;          // of finished jobs, and their cache slots (for the CR)
  long slots = 0;
  double busy_seconds = 0;      // wall time spent in steps
  double ttft_seconds_sum = 0;  // acceptance to first token, over ttft_count jobs
  long ttft_count = 0;
  // A round is one Scheduler::StepOnce: the prompts' parallel prefills it admits, if any, then a
  // decode step of the running batch. The rounds that prefilled hold up every running stream's
  // next token by their prefill: apart, they show what prefill adds to the per-token latency.
  RoundHistogram decode_rounds, prefill_rounds;  // without / with a parallel prefill
  std::map<std::string, long> finished;  // jobs ended, by FinishReasonName
  double achieved_cr() const { return slots > 0 ? double(tokens_fed) / double(slots) : 1.0; }
};

class ServeEngineLoop {
 public:
  // The engine must outlive the loop; prefill_tokens_per_step: the Scheduler's prefill budget.
  ServeEngineLoop(DecodeEngine& engine, int max_batch, int max_queue,
                  long prefill_tokens_per_step = 0);
  ~ServeEngineLoop();  // Shutdown()

  // Starts the engine thread.
  void Start();
  // Accepts a job and returns its handle; Unavailable when max_queue jobs wait already or after
  // Shutdown. The request is validated on the engine thread (Scheduler::Submit): a refusal ends
  // the job with kError.
  absl::StatusOr<int64_t> Submit(ServeJob job);
  // Ends the job at the next step (kCancelled); unknown and finished handles are ignored.
  void Cancel(int64_t handle);
  // Stops accepting, ends every job (kShutdown, each through its on_finish) and joins the thread.
  void Shutdown();

  ServeMetrics metrics() const;

 private:
  struct Live {
    ServeJob job;
    int64_t handle;
    std::chrono::steady_clock::time_point accepted;
    int prompt_tokens = 0;
    bool first_token = false;
  };
  void Run();
  // Moves the inbox and the cancellations into the scheduler; false once shutting down.
  bool Intake();
  void EndAll(FinishReason reason, const std::string& error);
  void Publish();

  DecodeEngine& engine_;
  const int max_batch_, max_queue_;
  const long prefill_tokens_per_step_;
  std::unique_ptr<Scheduler> scheduler_;  // engine thread only
  std::map<int, Live> live_;              // scheduler id → job; engine thread only
  std::map<int64_t, int> ids_;            // handle → scheduler id; engine thread only
  std::map<int, FinishReason> reasons_;   // set before Finish runs: kStop for a false on_token

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::vector<Live> inbox_;
  std::vector<int64_t> cancels_;
  int64_t next_handle_ = 1;
  int outstanding_ = 0;  // accepted, not finished
  bool stopping_ = false;
  ServeMetrics published_;
  ServeMetrics m_;  // engine thread's working copy
  std::thread thread_;
};

}  // namespace dmc::inference
