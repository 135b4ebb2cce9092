// Data pipeline, part 1: tokenizers and dmc-prep (text/JSONL -> shards), round trips through the
// loader, the validation split, SentencePiece.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "data/index.h"
#include "data/loader.h"
#include "data/prep.h"
#include "data/sha256.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "gtest/gtest.h"

namespace dmc::data {
namespace {

namespace fs = std::filesystem;

#ifndef DMC_SOURCE_DIR
#define DMC_SOURCE_DIR "."
#endif

// Temp folders, removed when the test binary exits.
struct TempDirs {
  std::vector<std::string> dirs;
  ~TempDirs() {
    std::error_code ec;
    for (const auto& d : dirs) fs::remove_all(d, ec);
  }
};

std::string NewTempDir(const std::string& tag) {
  static TempDirs all;
  static std::atomic<int> counter{0};
  fs::path p = fs::path(::testing::TempDir()) /
               ("dmc_data_prep_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
  fs::remove_all(p);
  fs::create_directories(p);
  all.dirs.push_back(p.string());
  return p.string();
}

void WriteFile(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// All tokens of a split, shard after shard.
std::vector<int32_t> ReadSplit(const std::string& index_path) {
  auto idx = ReadIndex(index_path);
  EXPECT_TRUE(idx.ok()) << idx.status();
  std::vector<int32_t> all;
  if (!idx.ok()) return all;
  for (const auto& e : idx->shards) {
    auto r = ShardReader::Open(e.resolved_path);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) continue;
    std::vector<uint32_t> buf(static_cast<size_t>((*r)->meta().num_tokens));
    EXPECT_TRUE((*r)->Read(0, static_cast<int64_t>(buf.size()), buf.data()).ok());
    all.insert(all.end(), buf.begin(), buf.end());
  }
  return all;
}

std::vector<int32_t> Stream(const Tokenizer& tok, const std::vector<std::string>& docs) {
  std::vector<int32_t> out;
  for (const auto& d : docs) {
    auto t = tok.Encode(d);
    out.insert(out.end(), t.begin(), t.end());
    out.push_back(tok.eos_id());
  }
  return out;
}

std::vector<std::string> SampleDocs(int n, int seed) {
  std::vector<std::string> docs;
  uint64_t x = 0x1234567u + seed;
  for (int i = 0; i < n; ++i) {
    std::string d = "Document " + std::to_string(i) + ":\n";
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    int words = 20 + static_cast<int>((x >> 33) % 200);
    static const char* kWords[] = {"and",
                                   "the",
                                   "light",
                                   "was",
                                   "good",
                                   "earth",
                                   "waters",
                                   "said",
                                   "day",
                                   "night",
                                   "\xc3\xa9t\xc3\xa9",
                                   "\t",
                                   "firmament",
                                   "\n"};
    for (int w = 0; w < words; ++w) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      d += kWords[(x >> 33) % 14];
      d += ' ';
    }
    docs.push_back(d);
  }
  return docs;
}

// Reads one epoch through the loader and checks each window against `stream` (the split's whole
// token stream) using the shard start offsets from the index.
void CheckEpochAgainstStream(const std::string& index_path, const std::vector<int32_t>& stream, int seq_len,
                             int batch, int prefetch) {
  LoaderOptions lo;
  lo.index_path = index_path;
  lo.seq_len = seq_len;
  lo.batch_size = batch;
  lo.seed = 7;
  lo.prefetch = prefetch;
  auto L = ShardLoader::Open(lo);
  ASSERT_TRUE(L.ok()) << L.status();
  std::vector<int64_t> shard_start{0};
  for (const auto& e : (*L)->index().shards) shard_start.push_back(shard_start.back() + e.num_tokens);
  std::set<int64_t> seen;
  std::vector<int32_t> in, tg;
  for (int64_t b = 0; b < (*L)->batches_per_epoch(); ++b) {
    std::vector<int64_t> ids = (*L)->WindowIds(0, b);
    ASSERT_TRUE((*L)->Next(&in, &tg).ok());
    ASSERT_EQ(in.size(), static_cast<size_t>(batch * seq_len));
    for (int w = 0; w < batch; ++w) {
      EXPECT_TRUE(seen.insert(ids[w]).second) << "window repeated in an epoch";
      auto [shard, off] = (*L)->WindowLocation(ids[w]);
      int64_t g = shard_start[shard] + off;
      for (int t = 0; t < seq_len; ++t) {
        ASSERT_EQ(in[w * seq_len + t], stream[g + t]);
        ASSERT_EQ(tg[w * seq_len + t], stream[g + t + 1]);
      }
    }
  }
  EXPECT_EQ(static_cast<int64_t>(seen.size()), (*L)->batches_per_epoch() * batch);
}

TEST(DataTokenizer, ByteTokenizer) {
  auto tok = LoadTokenizer("byte");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 259);
  EXPECT_EQ((*tok)->bos_id(), 256);
  EXPECT_EQ((*tok)->eos_id(), 257);
  EXPECT_EQ((*tok)->name(), "byte");
  std::string text = "In the beginning\n\xc3\xa9\xff";
  auto ids = (*tok)->Encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[0], 'I');
  EXPECT_EQ(ids.back(), 255);
  ids.push_back(257);
  ids.insert(ids.begin(), 256);
  EXPECT_EQ((*tok)->Decode(ids), text);
}

TEST(DataTokenizer, LoadErrorsNameTheFile) {
  std::string dir = NewTempDir("tok");
  auto missing = LoadTokenizer(dir + "/nope.model");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find(dir + "/nope.model"), std::string::npos) << missing.status();
  WriteFile(dir + "/garbage.model", "this is not a protobuf \x01\x02\x03");
  auto garbage = LoadTokenizer(dir + "/garbage.model");
  ASSERT_FALSE(garbage.ok());
  EXPECT_NE(garbage.status().message().find("garbage.model"), std::string::npos) << garbage.status();
}

TEST(DataTokenizer, Sha256) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex(std::string(1000, 'a')),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
}

TEST(DataPrep, ByteRoundTripTextToShardsToWindows) {
  std::string dir = NewTempDir("rt");
  auto docs = SampleDocs(12, 1);
  std::vector<std::string> sorted_docs;
  for (size_t i = 0; i < docs.size(); ++i) {
    std::string name =
        "/in/sub" + std::to_string(i % 3) + "/doc_" + (i < 10 ? "0" : "") + std::to_string(i) + ".txt";
    WriteFile(dir + name, docs[i]);
  }
  WriteFile(dir + "/in/README.md", "not a document");  // ignored: not .txt/.jsonl
  WriteFile(dir + "/in/sub0/empty.txt", "");           // skipped: empty
  // Directory order is sorted by path: sub0/doc_00, sub0/doc_03, ..., sub1/..., sub2/...
  for (int s = 0; s < 3; ++s)
    for (size_t i = s; i < docs.size(); i += 3) sorted_docs.push_back(docs[i]);

  PrepOptions o;
  o.inputs = {dir + "/in"};
  o.output_dir = dir + "/out";
  o.shard_tokens = 300;  // > 16 shards (the loader's open-file LRU evicts), documents cut across shards
  o.chunk_tokens = 64;   // several HDF5 chunks per shard
  o.threads = 3;
  o.progress = false;
  auto r = RunPrep(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->documents, 12);
  EXPECT_EQ(r->empty_documents, 1);
  EXPECT_EQ(r->ignored_files, 1);
  EXPECT_TRUE(r->val_index.empty());
  ByteTokenizer tok;
  std::vector<int32_t> expect = Stream(tok, sorted_docs);
  EXPECT_EQ(r->train_tokens, static_cast<int64_t>(expect.size()));
  EXPECT_GT(r->train_shards, 16);
  EXPECT_EQ(ReadSplit(r->train_index), expect);

  // Index and shard metadata.
  auto idx = ReadIndex(r->train_index);
  ASSERT_TRUE(idx.ok()) << idx.status();
  EXPECT_EQ(idx->tokenizer, "byte");
  EXPECT_EQ(idx->vocab_size, 259);
  EXPECT_EQ(idx->bos_id, 256);
  EXPECT_EQ(idx->eos_id, 257);
  EXPECT_EQ(idx->num_documents, 12);
  int64_t starts = 0;
  for (size_t s = 0; s < idx->shards.size(); ++s) {
    auto sr = ShardReader::Open(idx->shards[s].resolved_path);
    ASSERT_TRUE(sr.ok()) << sr.status();
    EXPECT_EQ((*sr)->meta().tokenizer, "byte");
    EXPECT_EQ((*sr)->meta().vocab_size, 259);
    if (s + 1 < idx->shards.size()) {
      EXPECT_EQ((*sr)->meta().num_tokens, 300);
    }
    auto offs = (*sr)->ReadDocOffsets();
    ASSERT_TRUE(offs.ok()) << offs.status();
    EXPECT_EQ(offs->back(), static_cast<uint64_t>((*sr)->meta().num_tokens));
    EXPECT_TRUE(std::is_sorted(offs->begin(), offs->end()));
    starts += static_cast<int64_t>(offs->size()) - 1 - ((*sr)->meta().continues_document ? 1 : 0);
    // Every segment but a continued one starts right after an EOS.
    for (size_t k = 0; k + 1 < offs->size(); ++k) {
      if (k == 0 && (*sr)->meta().continues_document) continue;
      if ((*offs)[k] == 0) continue;
      uint32_t prev = 0;
      ASSERT_TRUE((*sr)->Read(static_cast<int64_t>((*offs)[k]) - 1, 1, &prev).ok());
      EXPECT_EQ(prev, 257u);
    }
  }
  EXPECT_EQ(starts, 12);  // every document starts exactly once

  // Windows through the loader (with and without the prefetch thread) equal the token stream.
  CheckEpochAgainstStream(r->train_index, expect, 32, 4, 2);
  CheckEpochAgainstStream(r->train_index, expect, 17, 3, 0);

  // A second run into the same folder replaces the old shards (only files named like ours).
  WriteFile(dir + "/out/train_000999.h5", "stale");
  WriteFile(dir + "/out/notes.txt", "mine");
  o.shard_tokens = 100000;
  auto again = RunPrep(o);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->train_shards, 1);
  EXPECT_FALSE(fs::exists(dir + "/out/train_000999.h5"));
  EXPECT_FALSE(fs::exists(dir + "/out/train_000001.h5"));
  EXPECT_TRUE(fs::exists(dir + "/out/notes.txt"));
  EXPECT_EQ(ReadSplit(again->train_index), expect);
}

TEST(DataPrep, JsonlInput) {
  std::string dir = NewTempDir("jsonl");
  std::vector<std::string> docs = {"first line\nsecond \"quoted\" line", "caf\xc3\xa9 \xe2\x82\xac 100",
                                   "third document", ""};
  std::string jl;
  jl += "{\"text\": \"first line\\nsecond \\\"quoted\\\" line\", \"id\": 1}\n";
  jl += "\n";  // blank line: skipped
  jl += "{\"id\": 2, \"text\": \"caf\\u00e9 \xe2\x82\xac 100\"}\n";
  jl += "{\"text\": \"third document\"}\n";
  jl += "{\"text\": \"\"}";  // empty document, no trailing newline
  WriteFile(dir + "/a.jsonl", jl);
  WriteFile(dir + "/b.txt", "a plain text document");
  PrepOptions o;
  o.inputs = {dir + "/a.jsonl", dir + "/b.txt"};
  o.output_dir = dir + "/out";
  o.progress = false;
  auto r = RunPrep(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->documents, 4);
  EXPECT_EQ(r->empty_documents, 1);
  ByteTokenizer tok;
  EXPECT_EQ(ReadSplit(r->train_index), Stream(tok, {docs[0], docs[1], docs[2], "a plain text document"}));

  // Malformed lines are errors naming file:line.
  WriteFile(dir + "/bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n");
  o.inputs = {dir + "/bad.jsonl"};
  auto bad = RunPrep(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(dir + "/bad.jsonl:2"), std::string::npos) << bad.status();
  WriteFile(dir + "/nofield.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
  o.inputs = {dir + "/nofield.jsonl"};
  auto nofield = RunPrep(o);
  ASSERT_FALSE(nofield.ok());
  EXPECT_NE(nofield.status().message().find(dir + "/nofield.jsonl:2"), std::string::npos) << nofield.status();
  EXPECT_NE(nofield.status().message().find("'text'"), std::string::npos) << nofield.status();
  // --text_field picks another field.
  o.text_field = "body";
  WriteFile(dir + "/body.jsonl", "{\"body\": \"x y z\"}\n");
  o.inputs = {dir + "/body.jsonl"};
  auto body = RunPrep(o);
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(ReadSplit(body->train_index), Stream(tok, {"x y z"}));
}

TEST(DataPrep, InputErrorsNameThePath) {
  std::string dir = NewTempDir("inerr");
  PrepOptions o;
  o.output_dir = dir + "/out";
  o.progress = false;
  o.inputs = {dir + "/missing.txt"};
  auto a = RunPrep(o);
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find(dir + "/missing.txt"), std::string::npos) << a.status();
  WriteFile(dir + "/x.csv", "a,b");
  o.inputs = {dir + "/x.csv"};
  auto b = RunPrep(o);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("x.csv"), std::string::npos) << b.status();
  fs::create_directories(dir + "/emptydir");
  o.inputs = {dir + "/emptydir"};
  auto c = RunPrep(o);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("emptydir"), std::string::npos) << c.status();
  o.inputs = {dir + "/x.csv"};
  o.tokenizer = dir + "/none.model";
  auto d = RunPrep(o);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("none.model"), std::string::npos) << d.status();
}

TEST(DataPrep, ValidationSplitByDocument) {
  std::string dir = NewTempDir("val");
  auto docs = SampleDocs(10, 2);
  for (size_t i = 0; i < docs.size(); ++i) WriteFile(dir + "/in/d" + std::to_string(i) + ".txt", docs[i]);
  PrepOptions o;
  o.inputs = {dir + "/in"};
  o.output_dir = dir + "/out";
  o.shard_tokens = 700;
  o.val_fraction = 0.3;
  o.progress = false;
  auto r = RunPrep(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->train_documents, 7);
  EXPECT_EQ(r->val_documents, 3);
  ASSERT_EQ(r->val_index, dir + "/out/val_index.json");
  // Files sort as d0, d1, d2, ..., d9: documents 3, 6, 9 of that order are held out.
  std::vector<std::string> train_docs, val_docs;
  for (int i = 0; i < 10; ++i) (i == 3 || i == 6 || i == 9 ? val_docs : train_docs).push_back(docs[i]);
  ByteTokenizer tok;
  auto train_stream = Stream(tok, train_docs), val_stream = Stream(tok, val_docs);
  EXPECT_EQ(ReadSplit(r->train_index), train_stream);
  EXPECT_EQ(ReadSplit(r->val_index), val_stream);
  EXPECT_EQ(r->train_tokens + r->val_tokens, static_cast<int64_t>(train_stream.size() + val_stream.size()));
  auto vidx = ReadIndex(r->val_index);
  ASSERT_TRUE(vidx.ok());
  EXPECT_EQ(vidx->split, "val");
  EXPECT_EQ(vidx->num_documents, 3);
  CheckEpochAgainstStream(r->val_index, val_stream, 16, 2, 2);

  // A fraction that selects no document is an error, not an empty validation set.
  o.val_fraction = 0.05;
  auto none = RunPrep(o);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("val_fraction"), std::string::npos) << none.status();
}

TEST(DataPrep, SentencePieceRoundTrip) {
  // Train a tiny BPE model on two books of the embedded corpus (SentencePieceTrainer, the same
  // code spm_train runs), then prep and read back through the loader.
  std::string corpus = std::string(DMC_SOURCE_DIR) + "/data/corpus";
  std::string a = corpus + "/kjv_08_ruth.txt", b = corpus + "/kjv_17_esther.txt";
  if (!fs::exists(a) || !fs::exists(b)) GTEST_SKIP() << "embedded corpus not found under " << corpus;
  std::string dir = NewTempDir("spm");
  std::string prefix = dir + "/tiny";
  absl::Status st = TrainSentencePiece("--input=" + a + "," + b + " --model_prefix=" + prefix +
                                       " --vocab_size=400 --model_type=bpe --character_coverage=1.0"
                                       " --byte_fallback=true --minloglevel=2");
  ASSERT_TRUE(st.ok()) << st;
  auto tok = LoadTokenizer(prefix + ".model");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 400);
  EXPECT_GE((*tok)->eos_id(), 0);
  std::string name = (*tok)->name();
  EXPECT_EQ(name, "sentencepiece:" + Sha256Hex(ReadFile(prefix + ".model")));
  std::string sample = "And Ruth said, Intreat me not to leave thee.";
  auto ids = (*tok)->Encode(sample);
  EXPECT_LT(ids.size(), sample.size());  // it merges
  EXPECT_EQ((*tok)->Decode(ids), sample);

  std::vector<std::string> docs = {ReadFile(a), ReadFile(b),
                                   "A line with a rare char: \xe2\x98\x83 and \xc3\xa9"};
  WriteFile(dir + "/in/3.txt", docs[2]);
  fs::copy_file(a, dir + "/in/1.txt");
  fs::copy_file(b, dir + "/in/2.txt");
  PrepOptions o;
  o.inputs = {dir + "/in"};
  o.output_dir = dir + "/out";
  o.tokenizer = prefix + ".model";
  o.shard_tokens = 5000;
  o.threads = 2;
  o.progress = false;
  auto r = RunPrep(o);
  ASSERT_TRUE(r.ok()) << r.status();
  auto expect = Stream(**tok, docs);
  EXPECT_EQ(ReadSplit(r->train_index), expect);
  auto idx = ReadIndex(r->train_index);
  ASSERT_TRUE(idx.ok());
  EXPECT_EQ(idx->tokenizer, name);
  EXPECT_EQ(idx->vocab_size, 400);
  EXPECT_EQ(idx->eos_id, (*tok)->eos_id());
  CheckEpochAgainstStream(r->train_index, expect, 64, 4, 2);

  // The loader accepts the matching tokenizer and rejects the byte one.
  LoaderOptions lo;
  lo.index_path = r->train_index;
  lo.seq_len = 64;
  lo.batch_size = 2;
  lo.expected_tokenizer = name;
  lo.expected_vocab_size = 400;
  EXPECT_TRUE(ShardLoader::Open(lo).ok());
  lo.expected_tokenizer = "byte";
  lo.expected_vocab_size = 0;
  auto wrong = ShardLoader::Open(lo);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find(r->train_index), std::string::npos) << wrong.status();
}

TEST(DataPrep, EmbeddedCorpusIsThere) {
  // The README's main job prepares data/corpus; keep it real, split into documents, < 2 MB.
  std::string corpus = std::string(DMC_SOURCE_DIR) + "/data/corpus";
  if (!fs::exists(corpus)) GTEST_SKIP() << "embedded corpus not found under " << corpus;
  int64_t bytes = 0, files = 0;
  for (const auto& e : fs::directory_iterator(corpus))
    if (e.path().extension() == ".txt") {
      bytes += static_cast<int64_t>(e.file_size());
      ++files;
    }
  EXPECT_GE(files, 20);
  EXPECT_GT(bytes, 1000000);
  EXPECT_LT(bytes, 2000000);
}

}  // namespace
}  // namespace dmc::data
