// dmc-serve's text work per generated token (inference/completion.h, CompletionText::Add): the
// engine thread runs it for every row of every step, under the stream's lock, so its cost times
// the batch is host time each step. One generation of --tokens tokens of real text (a book of the
// embedded corpus), through the byte tokenizer and through a SentencePiece BPE model with byte
// fallback (Llama's kind) trained here on two books; with and without a stop string. Prints the
// mean µs per token over the generation and over its last 100 tokens.
//
//   bench_completion_text [--tokens=1024] [--vocab=8000] [--repeats=5]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "data/tokenizer.h"
#include "inference/completion.h"

ABSL_FLAG(int, tokens, 1024, "generated tokens per generation");
ABSL_FLAG(int, vocab, 8000, "the SentencePiece model's vocabulary");
ABSL_FLAG(int, repeats, 5, "generations timed per row (the fastest is kept)");

namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Mean µs per Add over all tokens and over the last 100, the fastest of `repeats` generations.
std::pair<double, double> TimeGeneration(const dmc::data::Tokenizer& tokenizer,
                                         const std::vector<int32_t>& ids,
                                         const std::vector<std::string>& stop, int repeats) {
  double best_all = 1e30, best_tail = 1e30;
  const size_t tail_from = ids.size() > 100 ? ids.size() - 100 : 0;
  for (int r = 0; r < repeats; ++r) {
    dmc::inference::CompletionText text(tokenizer, stop);
    const auto start = Clock::now();
    auto tail_start = start;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i == tail_from) tail_start = Clock::now();
      text.Add(ids[i]);
    }
    const auto end = Clock::now();
    best_all = std::min(best_all, std::chrono::duration<double, std::micro>(end - start).count() /
                                      ids.size());
    best_tail = std::min(best_tail, std::chrono::duration<double, std::micro>(end - tail_start)
                                            .count() / (ids.size() - tail_from));
  }
  return {best_all, best_tail};
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int n = absl::GetFlag(FLAGS_tokens), repeats = absl::GetFlag(FLAGS_repeats);
  const std::string corpus = std::string(DMC_SOURCE_DIR) + "/data/corpus/";
  const std::string book = ReadFile(corpus + "kjv_19_psalms.txt");
  if (book.empty()) {
    std::fprintf(stderr, "bench_completion_text: cannot read %skjv_19_psalms.txt\n",
                 corpus.c_str());
    return 1;
  }
  const fs::path dir = fs::temp_directory_path() / "bench_completion_text";
  fs::create_directories(dir);
  const std::string prefix = (dir / "spm").string();
  const absl::Status trained = dmc::data::TrainSentencePiece(
      "--input=" + corpus + "kjv_01_genesis.txt," + corpus + "kjv_18_job.txt --model_prefix=" +
      prefix + " --vocab_size=" + std::to_string(absl::GetFlag(FLAGS_vocab)) +
      " --model_type=bpe --character_coverage=1.0 --byte_fallback=true --minloglevel=2");
  if (!trained.ok()) {
    std::fprintf(stderr, "bench_completion_text: %s\n", trained.ToString().c_str());
    return 1;
  }
  auto spm = dmc::data::LoadTokenizer(prefix + ".model");
  auto bytes = dmc::data::LoadTokenizer("byte");
  if (!spm.ok() || !bytes.ok()) {
    std::fprintf(stderr, "bench_completion_text: cannot load the tokenizers\n");
    return 1;
  }
  std::printf("CompletionText::Add, %d generated tokens of Psalms, fastest of %d\n\n", n, repeats);
  std::printf("| tokenizer | stop strings | µs per token (mean) | µs per token (last 100) |\n");
  std::printf("| --- | --- | ---: | ---: |\n");
  for (const auto* tokenizer : {bytes->get(), spm->get()}) {
    std::vector<int32_t> ids = tokenizer->Encode(book);
    if (static_cast<int>(ids.size()) < n) {
      std::fprintf(stderr, "bench_completion_text: the book gives only %zu tokens\n", ids.size());
      return 1;
    }
    ids.resize(n);
    for (const std::vector<std::string>& stop :
         {std::vector<std::string>{}, std::vector<std::string>{"<|end|>"}}) {
      const auto [all, tail] = TimeGeneration(*tokenizer, ids, stop, repeats);
      std::printf("| %s | %zu | %.2f | %.2f |\n",
                  tokenizer == bytes->get() ? "byte" : "SentencePiece BPE", stop.size(), all,
                  tail);
    }
  }
  fs::remove_all(dir);
  return 0;
}
