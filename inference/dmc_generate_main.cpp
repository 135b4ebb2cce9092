// dmc-generate --model=HF_DIR --prompt="..." : continues a prompt, the prompt in one parallel pass
// that writes the compressed cache (h2o and tova, which evict by each step's attention, and loma,
// which compresses between steps: token by token), then token by token (greedy by default; --temperature and --top_p sample, seeded:
// kernels/sample.h), on the CPU engine or the GPU one (--device=cuda), and prints the compression
// ratio the cache reached.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "data/tokenizer.h"
#include "inference/engine_setup.h"
#include "inference/hf_model.h"
#include "inference/paged_decoder.h"
#include "inference/scheduler.h"

ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint directory (dmc-export output)");
ABSL_FLAG(std::string, tokenizer, "",
          "\"byte\" or a SentencePiece tokenizer.model; default: the model directory's "
          "tokenizer.model, else byte");
ABSL_FLAG(std::string, prompt, "", "text to continue");
ABSL_FLAG(bool, bos, false, "prepend the BOS token to the prompt");
ABSL_FLAG(int, max_new_tokens, 200, "tokens to generate at most (stops early at EOS)");
ABSL_FLAG(double, temperature, 0.0, "0: greedy; > 0: sample from softmax(logits / temperature)");
ABSL_FLAG(double, top_p, 1.0, "nucleus: sample among the most likely tokens of this total mass");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(int, page_size, 16, "slots per KV cache page");
ABSL_FLAG(std::string, method, "",
          "cache method: dmc (default for a DMC model), dms (default for a DMS model), loma "
          "(default for a LoMA model), vanilla, h2o or tova");
ABSL_FLAG(double, baseline_cr, 2.0,
          "h2o and tova: the compression ratio their budget is set to, over the whole text");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda (the GPU engine)");

namespace {

namespace inf = dmc::inference;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmc-generate: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "dmc-generate --model=HF_DIR --prompt=TEXT [--temperature=0.8] [--device=cuda]");
  absl::ParseCommandLine(argc, argv);
  const std::string model_dir = absl::GetFlag(FLAGS_model), device = absl::GetFlag(FLAGS_device);
  if (model_dir.empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const double temperature = absl::GetFlag(FLAGS_temperature), top_p = absl::GetFlag(FLAGS_top_p);
  if (temperature < 0 || !(top_p > 0 && top_p <= 1))
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "--temperature must be >= 0 and --top_p in (0, 1], got %g and %g", temperature, top_p)));
  if (device != "cpu" && device != "cuda")
    return Fail(absl::InvalidArgumentError("--device=" + device + ": expected cpu or cuda"));

  auto model = inf::LoadHfModel(model_dir);
  if (!model.ok()) return Fail(model.status());
  const dmc::model::LlamaConfig& c = (*model)->config();
  absl::StatusOr<inf::CacheMethod> method =
      inf::ChooseCacheMethod(c, absl::GetFlag(FLAGS_method), model_dir,
                             "dmc,dms,vanilla,h2o,tova,loma");
  if (!method.ok()) return Fail(method.status());
  const std::string method_name = inf::CacheMethodName(*method);
  auto tokenizer = inf::ChooseTokenizer(absl::GetFlag(FLAGS_tokenizer), model_dir, c.vocab_size);
  if (!tokenizer.ok()) return Fail(tokenizer.status());

  std::vector<int32_t> prompt;
  if (absl::GetFlag(FLAGS_bos)) prompt.push_back((*tokenizer)->bos_id());
  for (int32_t t : (*tokenizer)->Encode(absl::GetFlag(FLAGS_prompt))) prompt.push_back(t);
  if (prompt.empty()) return Fail(absl::InvalidArgumentError("the prompt is empty (pass --prompt or --bos)"));
  if (static_cast<int>(prompt.size()) >= c.max_position_embeddings)
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "the prompt has %d tokens; max_position_embeddings %d leaves no room to generate",
        prompt.size(), c.max_position_embeddings)));
  if (absl::GetFlag(FLAGS_max_new_tokens) < 1)
    return Fail(absl::InvalidArgumentError("--max_new_tokens must be >= 1"));
  // The text's whole length; the last token is chosen, never fed.
  const int length = std::min<int>(c.max_position_embeddings,
                                   prompt.size() + absl::GetFlag(FLAGS_max_new_tokens));

  // Budget: the whole context in every head (LoMA's compression peak), plus the window state.
  const int page_size = absl::GetFlag(FLAGS_page_size);
  absl::StatusOr<inf::CachePolicy> policy =
      inf::PolicyForCr(*method, length, absl::GetFlag(FLAGS_baseline_cr));
  if (!policy.ok()) return Fail(policy.status());
  const inf::PagedCacheOptions shape = inf::CacheOptionsFor(c, *method, 0, page_size);
  const long heads = long(c.num_hidden_layers) * c.num_key_value_heads;
  const long budget = inf::KvSequenceBytes<float>(
      shape, std::vector<int>(heads, inf::MaxHeadSlots(c, *method, length)));
  inf::EngineSpec spec;
  spec.device = device;
  spec.policy = *policy;
  spec.budget_bytes = budget;
  spec.page_size = page_size;
  spec.max_batch = 1;
  spec.max_context = length;
  absl::StatusOr<std::unique_ptr<inf::DecodeEngine>> created = inf::CreateEngine(**model, spec);
  if (!created.ok()) return Fail(created.status());
  std::unique_ptr<inf::DecodeEngine> engine = *std::move(created);

  inf::Request request;
  request.tokens = prompt;
  request.length = length - 1;
  request.sampling = {static_cast<float>(temperature), static_cast<float>(top_p),
                      absl::GetFlag(FLAGS_seed)};
  request.prefill = true;
  std::vector<int32_t> generated;
  long slots = 0;
  int fed = 0;
  const auto start = std::chrono::steady_clock::now();
  auto prefilled = start;
  std::vector<inf::Request> requests = {request};
  absl::StatusOr<inf::SchedulerStats> stats = inf::RunBatched(
      *engine, requests, 1,
      [&](int, int pos, const inf::TokenOutput& out) {
        if (pos + 1 < static_cast<int>(prompt.size())) return true;
        if (pos + 1 == static_cast<int>(prompt.size())) prefilled = std::chrono::steady_clock::now();
        if (out.next == (*tokenizer)->eos_id()) return false;
        generated.push_back(out.next);
        return true;
      },
      [&](int r, bool) {
        fed = engine->tokens(r);
        slots = engine->slots(r);
      });
  if (!stats.ok()) return Fail(stats.status());
  const auto done = std::chrono::steady_clock::now();
  const double prefill_s = std::chrono::duration<double>(prefilled - start).count();
  const double decode_s = std::chrono::duration<double>(done - prefilled).count();

  std::printf("%s%s\n", absl::GetFlag(FLAGS_prompt).c_str(),
              (*tokenizer)->Decode(generated).c_str());
  std::fprintf(stderr,
               "dmc-generate: %zu prompt tokens prefilled at %.0f tokens/s, %zu generated at %.0f "
               "tokens/s on the %s, cache CR %.2f (%ld slots over %ld layer-heads, %s)\n",
               prompt.size(), prompt.size() / std::max(1e-9, prefill_s), generated.size(),
               generated.size() / std::max(1e-9, decode_s), device.c_str(),
               double(fed) * heads / double(std::max(1L, slots)), slots, heads,
               method_name.c_str());
  return 0;
}
