// dmc-generate --model=HF_DIR --prompt="..." : continues a prompt with a DMC model, token by token
// over the paged DMC cache (greedy by default; --temperature and --top_p sample, seeded), and
// prints the compression ratio the cache reached.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "data/tokenizer.h"
#include "inference/hf_model.h"
#include "inference/paged_decoder.h"
#include "inference/sampler.h"

ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint directory (dmc-export output)");
ABSL_FLAG(std::string, tokenizer, "byte", "\"byte\" or a SentencePiece tokenizer.model");
ABSL_FLAG(std::string, prompt, "", "text to continue");
ABSL_FLAG(bool, bos, false, "prepend the BOS token to the prompt");
ABSL_FLAG(int, max_new_tokens, 200, "tokens to generate at most (stops early at EOS)");
ABSL_FLAG(double, temperature, 0.0, "0: greedy; > 0: sample from softmax(logits / temperature)");
ABSL_FLAG(double, top_p, 1.0, "nucleus: sample among the most likely tokens of this total mass");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(int, page_size, 16, "slots per KV cache page");

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dmc-generate: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("dmc-generate --model=HF_DIR --prompt=TEXT [--temperature=0.8]");
  absl::ParseCommandLine(argc, argv);
  namespace inf = dmc::inference;
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  if (model_dir.empty()) return Fail(absl::InvalidArgumentError("--model is required"));
  const double temperature = absl::GetFlag(FLAGS_temperature), top_p = absl::GetFlag(FLAGS_top_p);
  if (temperature < 0 || !(top_p > 0 && top_p <= 1))
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "--temperature must be >= 0 and --top_p in (0, 1], got %g and %g", temperature, top_p)));

  auto model = inf::LoadHfModel(model_dir);
  if (!model.ok()) return Fail(model.status());
  const dmc::model::LlamaConfig& c = (*model)->config();
  auto tokenizer = dmc::data::LoadTokenizer(absl::GetFlag(FLAGS_tokenizer));
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  if ((*tokenizer)->vocab_size() != c.vocab_size)
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "tokenizer %s has %d tokens, the model in %s has vocab_size %d",
        absl::GetFlag(FLAGS_tokenizer), (*tokenizer)->vocab_size(), model_dir, c.vocab_size)));

  std::vector<int32_t> prompt;
  if (absl::GetFlag(FLAGS_bos)) prompt.push_back((*tokenizer)->bos_id());
  for (int32_t t : (*tokenizer)->Encode(absl::GetFlag(FLAGS_prompt))) prompt.push_back(t);
  if (prompt.empty()) return Fail(absl::InvalidArgumentError("the prompt is empty (pass --prompt or --bos)"));
  const int length = std::min<int>(c.max_position_embeddings,
                                   prompt.size() + absl::GetFlag(FLAGS_max_new_tokens));
  if (static_cast<int>(prompt.size()) > length)
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "the prompt has %d tokens, more than max_position_embeddings %d", prompt.size(),
        c.max_position_embeddings)));

  // Budget: the whole context in every head, plus the window state (one sequence).
  const long heads = long(c.num_hidden_layers) * c.num_key_value_heads;
  const int page_size = absl::GetFlag(FLAGS_page_size);
  const long budget = heads * ((length + page_size - 1) / page_size * page_size * 2L *
                                   c.head_dim() * long(sizeof(float)) +
                               inf::DmcWindow<float>::Bytes(c.dmc.window, c.head_dim()));
  // A DMS model decodes with its own evictions; any other with the dmc cache (DMC off: vanilla).
  const inf::CacheMethod method = c.dms.enabled ? inf::CacheMethod::kDms : inf::CacheMethod::kDmc;
  inf::PagedKvCache<float> cache(inf::CacheOptionsFor(c, method, budget, page_size));
  auto decoder = inf::PagedDecoder<float>::Create(**model, inf::CachePolicy{method}, &cache);
  if (!decoder.ok()) return Fail(decoder.status());

  inf::Sampler sampler({static_cast<float>(temperature), static_cast<float>(top_p),
                        absl::GetFlag(FLAGS_seed)});
  if (absl::Status s = cache.AddSequence(0); !s.ok()) return Fail(s);
  // The prompt in one parallel pass (its cache materialised from it), then token by token.
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<float>> prompt_logits =
      inf::Prefill(**model, method, &cache, 0, prompt);
  if (!prompt_logits.ok()) return Fail(prompt_logits.status());
  const auto prefilled = std::chrono::steady_clock::now();
  std::vector<int32_t> generated;
  int32_t next = sampler.Sample(prompt_logits->data() + (prompt.size() - 1) * c.vocab_size,
                                c.vocab_size);
  std::vector<float> logits;
  while (next != (*tokenizer)->eos_id() &&
         static_cast<int>(prompt.size() + generated.size()) < length) {
    generated.push_back(next);
    if (static_cast<int>(prompt.size() + generated.size()) == length) break;
    if (absl::Status s = (*decoder)->Step({0}, &next, &logits); !s.ok()) return Fail(s);
    next = sampler.Sample(logits.data(), c.vocab_size);
  }
  const auto done = std::chrono::steady_clock::now();
  const double prefill_s = std::chrono::duration<double>(prefilled - start).count();
  const double decode_s = std::chrono::duration<double>(done - prefilled).count();

  std::printf("%s%s\n", absl::GetFlag(FLAGS_prompt).c_str(),
              (*tokenizer)->Decode(generated).c_str());
  std::fprintf(stderr,
               "dmc-generate: %zu prompt tokens prefilled at %.0f tokens/s, %zu generated at %.0f "
               "tokens/s, cache CR %.2f (%ld slots over %ld layer-heads, %s %s)\n",
               prompt.size(), prompt.size() / std::max(1e-9, prefill_s), generated.size(),
               generated.size() / std::max(1e-9, decode_s),
               double(cache.tokens(0)) * heads / double(cache.total_slots(0)),
               cache.total_slots(0), heads, c.dms.enabled ? "DMS" : "DMC",
               c.compression_enabled() ? "on" : "off");
  return 0;
}
