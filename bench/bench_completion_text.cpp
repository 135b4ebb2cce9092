// dmc-serve's text work per generated token (inference/completion.h): the engine thread runs Add
// for every row of every step, under the stream's lock, so its cost times the batch is host time
// each step; the thread streaming the request runs Release. One generation of --tokens tokens of
// real text (a book of the embedded corpus), through the byte tokenizer and through a
// SentencePiece BPE model with byte fallback (Llama's kind) trained here on two books; with and
// without a stop string. Prints the µs per token of each, mean over the generation and over its
// last 100 tokens.
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

// µs per token of Add (the engine thread's part) and of Release (the streaming thread's, called
// after every token as a stream keeping up does): means over all tokens and over the last 100,
// the fastest of `repeats` generations.
struct Timing {
  double add_all = 1e30, add_tail = 1e30, release_all = 1e30, release_tail = 1e30;
};

Timing TimeGeneration(const dmc::data::Tokenizer& tokenizer, const std::vector<int32_t>& ids,
                      const std::vector<std::string>& stop, int repeats) {
  Timing best;
  const size_t n = ids.size(), tail_from = n > 100 ? n - 100 : 0;
  for (int r = 0; r < repeats; ++r) {
    dmc::inference::CompletionText text(tokenizer, stop);
    double add = 0, add_tail = 0, release = 0, release_tail = 0;
    for (size_t i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      text.Add(ids[i]);
      const auto t1 = Clock::now();
      text.Release(false);
      const auto t2 = Clock::now();
      const double a = std::chrono::duration<double, std::micro>(t1 - t0).count();
      const double b = std::chrono::duration<double, std::micro>(t2 - t1).count();
      add += a;
      release += b;
      if (i >= tail_from) {
        add_tail += a;
        release_tail += b;
      }
    }
    best.add_all = std::min(best.add_all, add / n);
    best.add_tail = std::min(best.add_tail, add_tail / (n - tail_from));
    best.release_all = std::min(best.release_all, release / n);
    best.release_tail = std::min(best.release_tail, release_tail / (n - tail_from));
  }
  return best;
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
  std::printf("| tokenizer | stop strings | Add µs (mean / last 100) | Release µs (mean / last 100) |\n");
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
      const Timing t = TimeGeneration(*tokenizer, ids, stop, repeats);
      std::printf("| %s | %zu | %.2f / %.2f | %.2f / %.2f |\n",
                  tokenizer == bytes->get() ? "byte" : "SentencePiece BPE", stop.size(),
                  t.add_all, t.add_tail, t.release_all, t.release_tail);
    }
  }
  fs::remove_all(dir);
  return 0;
}
