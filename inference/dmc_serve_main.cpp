// dmc-serve --model=HF_DIR [--device=cuda] [--port=8000] [--kv_budget_mb=...] [--max_batch=...]
// [--method=dmc|dms|vanilla|h2o|tova|loma]: serves a retrofitted model over HTTP (OpenAI-style
// /v1/completions, /health, /metrics) with continuous batching. This file only reads flags and
// wires the pieces: the engine (engine_setup.h), the engine thread (serve_engine_loop.h) and the
// HTTP layer (server.h). SIGTERM or SIGINT: stop accepting, end running streams with a final
// event, exit 0.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "inference/engine_setup.h"
#include "inference/hf_model.h"
#include "inference/paged_decoder.h"
#include "inference/serve_engine_loop.h"
#include "inference/server.h"

ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint directory (dmc-export output)");
ABSL_FLAG(std::string, tokenizer, "",
          "\"byte\" or a SentencePiece tokenizer.model; default: the model directory's "
          "tokenizer.model, else byte");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda (the GPU engine)");
ABSL_FLAG(std::string, method, "",
          "cache method: dmc (default for a DMC model), dms (default for a DMS model), loma "
          "(default for a LoMA model), vanilla, h2o, tova");
ABSL_FLAG(double, baseline_cr, 2.0, "h2o and tova: the compression ratio their budget is set to");
ABSL_FLAG(std::string, host, "127.0.0.1", "address to listen on");
ABSL_FLAG(int, port, 8000, "port to listen on; 0: any free port (printed on stdout)");
ABSL_FLAG(double, kv_budget_mb, 64, "KV cache budget in MiB (pages and window state)");
ABSL_FLAG(int, max_batch, 32, "sequences decoded together at most");
ABSL_FLAG(int, max_queue, 64, "accepted requests that may wait for room; past it: HTTP 503");
ABSL_FLAG(int, page_size, 16, "slots per KV cache page");
ABSL_FLAG(int64_t, prefill_tokens_per_step, 0,
          "prompt tokens prefilled per scheduler step at most: longer prompts go in chunks over "
          "successive steps, between decode steps (an engine without chunked prefill: at least "
          "one whole prompt a step); bounds the running streams' per-token latency. 0: no bound");
ABSL_FLAG(int, max_body_kb, 1024, "largest request body in KiB; past it: HTTP 413");
ABSL_FLAG(bool, launch_ahead, true,
          "--device=cuda, vanilla and dmc: launch each decode step before the previous one's "
          "tokens are delivered, so the GPU runs while the server streams them");

namespace {

namespace inf = dmc::inference;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmc-serve: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Signals go to one waiting thread; every other thread blocks them. The mask is set before
  // anything starts a thread (the model loader's pool, the CUDA runtime's own threads, httplib's),
  // since threads inherit it: a SIGTERM delivered to a thread that does not block it would kill
  // the process instead of draining it.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);  // a client that hangs up is a failed write, not a crash

  absl::SetProgramUsageMessage(
      "dmc-serve --model=HF_DIR [--device=cuda] [--port=8000] [--kv_budget_mb=64] "
      "[--max_batch=32] [--method=dmc|dms|vanilla|h2o|tova|loma]");
  absl::ParseCommandLine(argc, argv);
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  if (model_dir.empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const int max_batch = absl::GetFlag(FLAGS_max_batch), max_queue = absl::GetFlag(FLAGS_max_queue);
  if (max_batch < 1 || max_queue < 0)
    return Fail(absl::InvalidArgumentError("--max_batch must be >= 1 and --max_queue >= 0"));

  auto model = inf::LoadHfModel(model_dir);
  if (!model.ok()) return Fail(model.status());
  const dmc::model::LlamaConfig& c = (*model)->config();
  const int context = c.max_position_embeddings;
  auto method = inf::ChooseCacheMethod(c, absl::GetFlag(FLAGS_method), model_dir,
                                       "dmc,dms,vanilla,h2o,tova,loma");
  if (!method.ok()) return Fail(method.status());
  auto tokenizer = inf::ChooseTokenizer(absl::GetFlag(FLAGS_tokenizer), model_dir, c.vocab_size);
  if (!tokenizer.ok()) return Fail(tokenizer.status());

  inf::EngineSpec spec;
  spec.device = absl::GetFlag(FLAGS_device);
  spec.policy.method = *method;
  if (*method == inf::CacheMethod::kH2O || *method == inf::CacheMethod::kTova) {
    auto policy = inf::PolicyForCr(*method, context, absl::GetFlag(FLAGS_baseline_cr));
    if (!policy.ok()) return Fail(policy.status());
    spec.policy = *policy;
  }
  spec.budget_bytes = static_cast<long>(absl::GetFlag(FLAGS_kv_budget_mb) * (1 << 20));
  spec.page_size = absl::GetFlag(FLAGS_page_size);
  spec.max_batch = max_batch;
  spec.max_context = context;
  spec.launch_ahead = absl::GetFlag(FLAGS_launch_ahead);
  auto engine = inf::CreateEngine(**model, spec);
  if (!engine.ok()) return Fail(engine.status());
  // One request of the whole context must fit alone, so that no request is refused mid-way;
  // counted at the engine's widths (the GPU engine's bf16 pages hold half the CPU's fp32 bytes).
  const inf::PagedCacheOptions shape = inf::CacheOptionsFor(c, *method, 0, spec.page_size);
  const long heads = long(c.num_hidden_layers) * c.num_key_value_heads;
  const long one = inf::KvSequenceBytes(
      shape, std::vector<int>(heads, inf::MaxHeadSlots(c, *method, context)),
      (*engine)->element_bytes(), (*engine)->state_element_bytes());
  if (spec.budget_bytes < one)
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "--kv_budget_mb=%g holds less than one sequence of the whole context on --device=%s "
        "(%d tokens, %.3f MiB)",
        absl::GetFlag(FLAGS_kv_budget_mb), spec.device, context, one / double(1 << 20))));

  if (absl::GetFlag(FLAGS_prefill_tokens_per_step) < 0)
    return Fail(absl::InvalidArgumentError("--prefill_tokens_per_step must be >= 0"));
  inf::ServeEngineLoop loop(**engine, max_batch, max_queue,
                            absl::GetFlag(FLAGS_prefill_tokens_per_step));
  inf::ServerOptions options;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.max_body_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_max_body_kb)) * 1024;
  options.threads = max_batch + max_queue + 8;  // every stream holds a thread; a few for the rest
  options.model_name = std::filesystem::path(model_dir).filename().string();
  inf::CompletionServer server(loop, **tokenizer, {c.vocab_size, context}, options);
  absl::StatusOr<int> port = server.Bind();
  if (!port.ok()) return Fail(port.status());
  loop.Start();

  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    std::fprintf(stderr, "dmc-serve: %s: finishing\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    server.Drain();   // new requests: 503
    loop.Shutdown();  // running streams get their final event
    server.Stop();    // once each stream has sent it
  });
  std::printf("dmc-serve: listening on http://%s:%d (%s, %s cache, %.1f MiB KV budget, "
              "max batch %d)\n",
              options.host.c_str(), *port, spec.device.c_str(), inf::CacheMethodName(*method),
              spec.budget_bytes / double(1 << 20), max_batch);
  std::fflush(stdout);
  server.Listen();
  pthread_kill(waiter.native_handle(), SIGTERM);  // wakes the waiter if Listen ended otherwise
  waiter.join();
  std::fprintf(stderr, "dmc-serve: stopped\n");
  return 0;
}
