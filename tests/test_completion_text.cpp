// CompletionText (inference/completion.h) decodes a generation token by token from a few tokens
// of context, when the text is asked for (or at each token, with stop strings): its text must be
// the tokenizer's Decode of the whole generation so far, and a stop string must cut it where the
// first match in that whole text begins.
// Checked on real text and on random ids (byte pieces that make broken and whole UTF-8
// characters, SentencePiece's spaces at any position), for the byte tokenizer and for a
// SentencePiece BPE model with byte fallback, Llama's kind.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "inference/completion.h"

namespace dmc {
namespace {

namespace fs = std::filesystem;
using inference::CompletionText;

std::string Corpus(const std::string& book) {
  std::ifstream in(std::string(DMC_SOURCE_DIR) + "/data/corpus/" + book, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A BPE model with byte fallback trained on two books (once for the whole test binary); null
// when that failed (the failure is reported).
const data::Tokenizer* SentencePiece() {
  static std::unique_ptr<data::Tokenizer> tokenizer = []() -> std::unique_ptr<data::Tokenizer> {
    const fs::path dir = fs::temp_directory_path() / ("completion_text_" + std::to_string(getpid()));
    fs::create_directories(dir);
    const std::string corpus = std::string(DMC_SOURCE_DIR) + "/data/corpus/";
    const absl::Status st = data::TrainSentencePiece(
        "--input=" + corpus + "kjv_08_ruth.txt," + corpus + "kjv_17_esther.txt --model_prefix=" +
        (dir / "m").string() +
        " --vocab_size=600 --model_type=bpe --character_coverage=1.0 --byte_fallback=true "
        "--minloglevel=2");
    EXPECT_TRUE(st.ok()) << st;
    auto loaded = data::LoadTokenizer((dir / "m.model").string());
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    fs::remove_all(dir);
    if (!loaded.ok()) return nullptr;
    return *std::move(loaded);
  }();
  return tokenizer.get();
}

std::unique_ptr<data::Tokenizer> Bytes() { return *data::LoadTokenizer("byte"); }

// Random ids below the vocabulary, EOS left out (it ends a generation).
std::vector<int32_t> RandomIds(const data::Tokenizer& t, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids;
  while (static_cast<int>(ids.size()) < n) {
    const int32_t id = static_cast<int32_t>(rng() % t.vocab_size());
    if (id != t.eos_id()) ids.push_back(id);
  }
  return ids;
}

// Feeds ids one by one; after each (or each `every`-th: the text is then decoded for several
// tokens at once), the text equals Decode of the tokens so far, and with a stop string it ends
// where Decode's first match begins (and the generation with it).
void ExpectWholeDecode(const data::Tokenizer& t, const std::vector<int32_t>& ids,
                       const std::string& what, const std::vector<std::string>& stop = {},
                       size_t every = 1) {
  CompletionText text(t, stop);
  std::vector<int32_t> fed;
  for (size_t i = 0; i < ids.size(); ++i) {
    const bool go_on = text.Add(ids[i]);
    fed.push_back(ids[i]);
    if ((i + 1) % every != 0 && go_on && i + 1 < ids.size()) continue;
    std::string whole = t.Decode(fed);
    size_t cut = std::string::npos;
    for (const std::string& s : stop) cut = std::min(cut, whole.find(s));
    if (cut != std::string::npos) whole.resize(cut);
    ASSERT_EQ(text.text(), whole) << what << ", after token " << i;
    ASSERT_EQ(go_on, cut == std::string::npos) << what << ", after token " << i;
    if (!go_on) return;
  }
}

TEST(CompletionText, EveryTokenGivesTheWholeDecodeOfRealText) {
  const std::string book = Corpus("kjv_19_psalms.txt");
  ASSERT_FALSE(book.empty()) << "embedded corpus not found";
  const std::string text = book.substr(0, 6000) + " caf\xc3\xa9 \xe2\x98\x83 \xf0\x9f\x98\x80";
  const data::Tokenizer* spm = SentencePiece();
  ASSERT_NE(spm, nullptr);
  ExpectWholeDecode(*Bytes(), Bytes()->Encode(text), "byte, Psalms");
  ExpectWholeDecode(*spm, spm->Encode(text), "SentencePiece, Psalms");
}

TEST(CompletionText, EveryTokenGivesTheWholeDecodeOfRandomIds) {
  const data::Tokenizer* spm = SentencePiece();
  ASSERT_NE(spm, nullptr);
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    ExpectWholeDecode(*Bytes(), RandomIds(*Bytes(), 300, seed), "byte, seed " + std::to_string(seed));
    ExpectWholeDecode(*spm, RandomIds(*spm, 300, seed), "SentencePiece, seed " + std::to_string(seed));
    // The text asked for every 7 tokens: decoded for 7 at once, as a stream that fell behind.
    ExpectWholeDecode(*spm, RandomIds(*spm, 300, seed),
                      "SentencePiece, every 7th, seed " + std::to_string(seed), {}, 7);
  }
}

// Runs of byte pieces only (SentencePiece's <0x..> ids): whole and broken UTF-8 characters,
// the case where a token completes a character begun tokens before.
TEST(CompletionText, ByteFallbackRunsGiveTheWholeDecode) {
  ASSERT_NE(SentencePiece(), nullptr);
  const data::Tokenizer& t = *SentencePiece();
  const std::vector<int32_t> smile = t.Encode("\xf0\x9f\x98\x80");  // one 4-byte character
  ASSERT_GE(smile.size(), 4u) << "the model has no byte pieces for it";
  std::vector<int32_t> byte_ids(smile.begin(), smile.end());
  for (const char* s : {"\xc3\xa9", "\xe2\x98\x83", "a"})
    for (int32_t id : t.Encode(s)) byte_ids.push_back(id);
  std::mt19937_64 rng(7);
  for (int round = 0; round < 20; ++round) {
    std::vector<int32_t> ids;
    for (int i = 0; i < 200; ++i) ids.push_back(byte_ids[rng() % byte_ids.size()]);
    ExpectWholeDecode(t, ids, "byte pieces, round " + std::to_string(round));
  }
}

TEST(CompletionText, StopStringsCutWhereTheWholeTextFirstMatches) {
  const std::string book = Corpus("kjv_19_psalms.txt").substr(0, 4000);
  ASSERT_FALSE(book.empty());
  const data::Tokenizer* spm = SentencePiece();
  ASSERT_NE(spm, nullptr);
  for (const std::vector<std::string>& stop :
       {std::vector<std::string>{"the LORD"}, std::vector<std::string>{"zzz", "Selah"},
        std::vector<std::string>{"\n"}}) {
    ExpectWholeDecode(*Bytes(), Bytes()->Encode(book), "byte, stop " + stop[0], stop);
    ExpectWholeDecode(*spm, spm->Encode(book), "SentencePiece, stop " + stop[0], stop);
  }
  // A stop string that random ids may spell across many tokens.
  for (uint64_t seed = 1; seed <= 5; ++seed)
    ExpectWholeDecode(*spm, RandomIds(*spm, 400, seed),
                      "SentencePiece random, seed " + std::to_string(seed), {"e", "th"});
}

}  // namespace
}  // namespace dmc
