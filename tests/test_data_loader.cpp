// Data pipeline, part 2: ShardLoader — permutation, disjoint coverage over 1/2/3 DP ranks, cursor
// save/restore (also across an epoch boundary and across layouts), and every bad-input case
// erroring with the file named.
#include <hdf5.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include "data/index.h"
#include "data/loader.h"
#include "data/shard.h"
#include "gtest/gtest.h"

namespace dmc::data {
namespace {

namespace fs = std::filesystem;

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
  fs::path p = fs::path(::testing::TempDir()) / ("dmc_data_loader_" + tag + "_" + std::to_string(::getpid()) +
                                                 "_" + std::to_string(counter++));
  fs::remove_all(p);
  fs::create_directories(p);
  all.dirs.push_back(p.string());
  return p.string();
}

int32_t TokenAt(int shard, int64_t i) { return static_cast<int32_t>((shard * 101 + i * 7 + i / 13) % 259); }

// Writes shards of the given sizes (token i of shard s = TokenAt(s, i)) and an index.
std::string MakeShards(const std::string& dir, const std::vector<int64_t>& sizes, int64_t vocab = 259,
                       const std::string& tokenizer = "byte") {
  ShardIndex idx;
  idx.split = "train";
  idx.tokenizer = tokenizer;
  idx.vocab_size = vocab;
  idx.bos_id = 256;
  idx.eos_id = 257;
  for (size_t s = 0; s < sizes.size(); ++s) {
    std::string name = "train_" + std::to_string(s) + ".h5";
    ShardMeta m;
    m.tokenizer = tokenizer;
    m.vocab_size = vocab;
    m.bos_id = 256;
    m.eos_id = 257;
    auto w = ShardWriter::Create(dir + "/" + name, m, 50);
    EXPECT_TRUE(w.ok()) << w.status();
    std::vector<int32_t> toks(static_cast<size_t>(sizes[s]));
    for (int64_t i = 0; i < sizes[s]; ++i) toks[i] = TokenAt(static_cast<int>(s), i);
    EXPECT_TRUE((*w)->Append(toks.data(), sizes[s], true).ok());
    EXPECT_TRUE((*w)->Close().ok());
    idx.shards.push_back({name, "", sizes[s], 1});
    idx.num_tokens += sizes[s];
    idx.num_documents += 1;
  }
  std::string path = dir + "/train_index.json";
  EXPECT_TRUE(WriteIndex(path, idx).ok());
  return path;
}

LoaderOptions Opts(const std::string& index, int seq_len, int batch, int rank = 0, int dp = 1,
                   int prefetch = 2) {
  LoaderOptions o;
  o.index_path = index;
  o.seq_len = seq_len;
  o.batch_size = batch;
  o.dp_rank = rank;
  o.dp_size = dp;
  o.seed = 1234;
  o.prefetch = prefetch;
  return o;
}

std::unique_ptr<ShardLoader> MustOpen(const LoaderOptions& o) {
  auto L = ShardLoader::Open(o);
  EXPECT_TRUE(L.ok()) << L.status();
  return L.ok() ? std::move(*L) : nullptr;
}

// One batch: inputs followed by targets.
std::vector<int32_t> NextBatch(ShardLoader* L) {
  std::vector<int32_t> in, tg;
  absl::Status s = L->Next(&in, &tg);
  EXPECT_TRUE(s.ok()) << s;
  in.insert(in.end(), tg.begin(), tg.end());
  return in;
}

void ExpectErrorNaming(const absl::Status& s, const std::string& file, const std::string& what = "") {
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find(file), std::string::npos) << "error does not name " << file << ": " << s;
  if (!what.empty()) {
    EXPECT_NE(s.message().find(what), std::string::npos) << "error lacks '" << what << "': " << s;
  }
}

TEST(DataLoader, PermutationIsABijection) {
  for (int64_t n : {1, 2, 3, 5, 16, 17, 1000, 4097}) {
    for (int64_t epoch : {0, 1}) {
      WindowPermutation p(n, 99, epoch);
      std::vector<bool> hit(static_cast<size_t>(n), false);
      for (int64_t i = 0; i < n; ++i) {
        int64_t v = p(i);
        ASSERT_GE(v, 0);
        ASSERT_LT(v, n);
        ASSERT_FALSE(hit[v]) << "n=" << n;
        hit[v] = true;
      }
    }
  }
  // Shuffles, and differently per epoch and seed.
  WindowPermutation a(1000, 1, 0), b(1000, 1, 1), c(1000, 2, 0);
  int fixed = 0, same_ab = 0, same_ac = 0;
  for (int i = 0; i < 1000; ++i) {
    fixed += a(i) == i;
    same_ab += a(i) == b(i);
    same_ac += a(i) == c(i);
  }
  EXPECT_LT(fixed, 20);
  EXPECT_LT(same_ab, 20);
  EXPECT_LT(same_ac, 20);
}

TEST(DataLoader, WindowsMatchShardTokens) {
  std::string dir = NewTempDir("win");
  // seq_len 8: shard 0 = 25 windows (201 tokens), shard 1 = 35 windows (287 tokens, 6 spare),
  // shard 2 too short for a window.
  std::string index = MakeShards(dir, {201, 287, 5});
  auto L = MustOpen(Opts(index, 8, 6));
  ASSERT_NE(L, nullptr);
  EXPECT_EQ(L->windows_per_epoch(), 60);
  EXPECT_EQ(L->batches_per_epoch(), 10);
  for (int64_t b = 0; b < 3; ++b) {
    auto ids = L->WindowIds(0, b);
    std::vector<int32_t> in, tg;
    ASSERT_TRUE(L->Next(&in, &tg).ok());
    for (int w = 0; w < 6; ++w) {
      auto [shard, off] = L->WindowLocation(ids[w]);
      ASSERT_LT(shard, 2);
      EXPECT_EQ(off % 8, 0);
      for (int t = 0; t < 8; ++t) {
        EXPECT_EQ(in[w * 8 + t], TokenAt(shard, off + t));
        EXPECT_EQ(tg[w * 8 + t], TokenAt(shard, off + t + 1));
      }
    }
  }
}

TEST(DataLoader, DisjointCoverageAcrossOneTwoThreeRanks) {
  std::string dir = NewTempDir("cov");
  std::string index = MakeShards(dir, {201, 287, 5});  // 60 windows of 8+1 tokens
  const int G = 6;                                     // global batch: 6x1, 3x2, 2x3
  const int epochs = 2, T = 8;
  // layout -> per (epoch, batch): the global batch = rank slices concatenated in rank order.
  std::map<int, std::vector<std::vector<int64_t>>> ids;
  std::map<int, std::vector<std::vector<int32_t>>> tokens;
  for (int dp : {1, 2, 3}) {
    const int B = G / dp;
    std::vector<std::unique_ptr<ShardLoader>> ranks;
    for (int r = 0; r < dp; ++r) ranks.push_back(MustOpen(Opts(index, T, B, r, dp, r % 2 ? 0 : 3)));
    const int64_t nb = ranks[0]->batches_per_epoch();
    ASSERT_EQ(nb, 10);
    for (int64_t e = 0; e < epochs; ++e) {
      std::set<int64_t> epoch_windows;
      for (int64_t b = 0; b < nb; ++b) {
        std::vector<int64_t> gids;
        std::vector<int32_t> gtok;
        for (int r = 0; r < dp; ++r) {
          EXPECT_EQ(ranks[r]->cursor().epoch, e);
          EXPECT_EQ(ranks[r]->cursor().batch, b);
          auto rid = ranks[r]->WindowIds(e, b);
          gids.insert(gids.end(), rid.begin(), rid.end());
          std::vector<int32_t> in, tg;
          ASSERT_TRUE(ranks[r]->Next(&in, &tg).ok());
          ASSERT_EQ(in.size(), static_cast<size_t>(B * T));
          for (int w = 0; w < B; ++w) {  // window-major: inputs then the final target
            gtok.insert(gtok.end(), in.begin() + w * T, in.begin() + (w + 1) * T);
            gtok.push_back(tg[(w + 1) * T - 1]);
          }
        }
        for (int64_t id : gids) EXPECT_TRUE(epoch_windows.insert(id).second) << "overlap, dp=" << dp;
        ids[dp].push_back(gids);
        tokens[dp].push_back(gtok);
      }
      // 60 windows / 6 per global batch: the epoch covers every window exactly once.
      EXPECT_EQ(epoch_windows.size(), 60u) << "dp=" << dp;
    }
  }
  EXPECT_EQ(ids[1], ids[2]);
  EXPECT_EQ(ids[1], ids[3]);
  EXPECT_EQ(tokens[1], tokens[2]);
  EXPECT_EQ(tokens[1], tokens[3]);
  EXPECT_NE(ids[1][0], ids[1][10]);  // epoch 1 is ordered differently from epoch 0
}

TEST(DataLoader, CursorRestoreGivesIdenticalContinuation) {
  std::string dir = NewTempDir("cur");
  std::string index = MakeShards(dir, {1000, 777, 1500});
  const int T = 16, B = 4;
  auto ref = MustOpen(Opts(index, T, B));
  ASSERT_NE(ref, nullptr);
  const int64_t nb = ref->batches_per_epoch();
  ASSERT_GT(nb, 5);
  const int64_t total = 2 * nb + 3;  // runs into the third epoch
  std::vector<std::vector<int32_t>> seq;
  std::vector<LoaderCursor> cursors;
  for (int64_t i = 0; i < total; ++i) {
    cursors.push_back(ref->cursor());
    seq.push_back(NextBatch(ref.get()));
  }
  EXPECT_EQ(cursors[nb].epoch, 1);
  EXPECT_EQ(cursors[nb].batch, 0);
  EXPECT_EQ(ref->cursor().epoch, 2);
  EXPECT_EQ(ref->cursor().batch, 3);

  // Save just before an epoch boundary, restore in a fresh loader (with and without prefetch),
  // through JSON and through the string form.
  for (int64_t k : {int64_t{0}, nb - 2, nb, 2 * nb - 1}) {
    for (int prefetch : {0, 2}) {
      nlohmann::json j = cursors[k].ToJson();
      auto c1 = LoaderCursor::FromJson(nlohmann::json::parse(j.dump()));
      ASSERT_TRUE(c1.ok()) << c1.status();
      auto c2 = LoaderCursor::FromString(cursors[k].ToString());
      ASSERT_TRUE(c2.ok()) << c2.status();
      EXPECT_EQ(*c1, cursors[k]);
      EXPECT_EQ(*c2, cursors[k]);
      auto L = MustOpen(Opts(index, T, B, 0, 1, prefetch));
      NextBatch(L.get());  // some progress to throw away
      ASSERT_TRUE(L->Restore(*c1).ok());
      EXPECT_EQ(L->cursor(), cursors[k]);
      for (int64_t i = k; i < total; ++i) ASSERT_EQ(NextBatch(L.get()), seq[i]) << "k=" << k << " i=" << i;
    }
  }
  // Restore on the same (prefetching) loader, going back.
  ASSERT_TRUE(ref->Restore(cursors[nb - 1]).ok());
  for (int64_t i = nb - 1; i < total; ++i) ASSERT_EQ(NextBatch(ref.get()), seq[i]);

  // A cursor saved with dp_size 1 restores under dp_size 2 with the same global batch.
  auto r0 = MustOpen(Opts(index, T, B / 2, 0, 2));
  auto r1 = MustOpen(Opts(index, T, B / 2, 1, 2));
  ASSERT_TRUE(r0->Restore(cursors[nb - 1]).ok());
  ASSERT_TRUE(r1->Restore(cursors[nb - 1]).ok());
  for (int64_t i = nb - 1; i < nb + 2; ++i) {
    std::vector<int32_t> a0, t0, a1, t1;
    ASSERT_TRUE(r0->Next(&a0, &t0).ok());
    ASSERT_TRUE(r1->Next(&a1, &t1).ok());
    std::vector<int32_t> got = a0;
    got.insert(got.end(), a1.begin(), a1.end());
    got.insert(got.end(), t0.begin(), t0.end());
    got.insert(got.end(), t1.begin(), t1.end());
    ASSERT_EQ(got, seq[i]);
  }

  // Mismatched cursors are refused.
  LoaderCursor bad = cursors[3];
  bad.seed += 1;
  ExpectErrorNaming(ref->Restore(bad), index, "seed");
  bad = cursors[3];
  bad.seq_len = 32;
  ExpectErrorNaming(ref->Restore(bad), index, "seq_len");
  bad = cursors[3];
  bad.global_batch = 8;
  ExpectErrorNaming(ref->Restore(bad), index, "global batch");
  bad = cursors[3];
  bad.batch = nb;
  EXPECT_FALSE(ref->Restore(bad).ok());
  EXPECT_FALSE(LoaderCursor::FromString("{\"epoch\": 1}").ok());
  EXPECT_FALSE(LoaderCursor::FromString("not json").ok());
}

// ---------------------------------------------------------------------------------------------
// Bad input: each case errors, naming the file.

TEST(DataLoaderBadInput, MissingShard) {
  std::string dir = NewTempDir("missing");
  std::string index = MakeShards(dir, {300, 300});
  fs::remove(dir + "/train_1.h5");
  auto L = ShardLoader::Open(Opts(index, 8, 2));
  ExpectErrorNaming(L.status(), dir + "/train_1.h5", "not found");
}

TEST(DataLoaderBadInput, CorruptShard) {
  std::string dir = NewTempDir("corrupt");
  std::string index = MakeShards(dir, {300, 300});
  {
    std::fstream f(dir + "/train_0.h5", std::ios::in | std::ios::out | std::ios::binary);
    std::string junk(512, '\x5a');
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  auto L = ShardLoader::Open(Opts(index, 8, 2));
  ExpectErrorNaming(L.status(), dir + "/train_0.h5");
}

// Flips the lowest bit of the first byte of token `at` of shard 0 in the file itself, found by the
// raw bytes of tokens [at, at + 8): a damage that leaves the token inside the vocabulary.
void FlipTokenInFile(const std::string& shard, int64_t at) {
  std::string pattern;
  for (int64_t i = at; i < at + 8; ++i) {
    const uint32_t t = static_cast<uint32_t>(TokenAt(0, i));
    pattern.append(reinterpret_cast<const char*>(&t), 4);  // little-endian, as the file stores it
  }
  std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t pos = bytes.find(pattern);
  ASSERT_NE(pos, std::string::npos);
  ASSERT_EQ(bytes.find(pattern, pos + 1), std::string::npos);
  ASSERT_LT((TokenAt(0, at) ^ 1), 259);
  f.seekp(static_cast<std::streamoff>(pos));
  f.put(static_cast<char>(bytes[pos] ^ 1));
}

// In-vocabulary damage inside the token data is caught by the chunk checksum: a read touching
// the chunk fails with DataLoss naming the file and the chunk; the other chunks still read.
TEST(DataLoaderBadInput, DamagedTokenChunkFailsItsChecksum) {
  std::string dir = NewTempDir("checksum");
  std::string index = MakeShards(dir, {300});  // chunks of 50 tokens
  const std::string shard = dir + "/train_0.h5";
  FlipTokenInFile(shard, 120);
  auto reader = ShardReader::Open(shard);
  ASSERT_TRUE(reader.ok()) << reader.status();
  std::vector<uint32_t> out(60);
  EXPECT_TRUE((*reader)->Read(0, 50, out.data()).ok());
  EXPECT_TRUE((*reader)->Read(150, 60, out.data()).ok());
  const absl::Status s = (*reader)->Read(90, 20, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  ExpectErrorNaming(s, shard, "token chunk 2 (tokens [100, 150)) fails its Fletcher-32 checksum");

  // Through the loader: some batch of the epoch reads the chunk and fails the same way.
  auto L = ShardLoader::Open(Opts(index, 8, 2));
  ASSERT_TRUE(L.ok()) << L.status();
  std::vector<int32_t> in, tgt;
  absl::Status first_error;
  for (int64_t b = 0; b < (*L)->batches_per_epoch() && first_error.ok(); ++b)
    first_error = (*L)->Next(&in, &tgt);
  EXPECT_EQ(first_error.code(), absl::StatusCode::kDataLoss) << first_error;
  ExpectErrorNaming(first_error, shard, "token chunk 2");
}

// A shard of format 1 (no checksums) is refused with the way to re-make it.
TEST(DataLoaderBadInput, ShardWithoutChecksumsIsRefused) {
  std::string dir = NewTempDir("v1");
  std::string index = MakeShards(dir, {300});
  const std::string shard = dir + "/train_0.h5";
  {
    hid_t file = H5Fopen(shard.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    hid_t attr = H5Aopen(file, "format_version", H5P_DEFAULT);
    const int64_t v1 = 1;
    EXPECT_GE(H5Awrite(attr, H5T_NATIVE_INT64, &v1), 0);
    H5Aclose(attr);
    H5Fclose(file);
  }
  auto L = ShardLoader::Open(Opts(index, 8, 2));
  EXPECT_EQ(L.status().code(), absl::StatusCode::kFailedPrecondition);
  ExpectErrorNaming(L.status(), shard, "re-make the shards with this dmc-prep");
}

TEST(DataLoaderBadInput, TruncatedShard) {
  std::string dir = NewTempDir("trunc");
  std::string index = MakeShards(dir, {3000, 300});
  std::string shard = dir + "/train_0.h5";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  auto L = ShardLoader::Open(Opts(index, 8, 2));
  ExpectErrorNaming(L.status(), shard);
}

TEST(DataLoaderBadInput, NotAShardFile) {
  std::string dir = NewTempDir("nothdf5");
  std::string index = MakeShards(dir, {300});
  std::ofstream(dir + "/train_0.h5", std::ios::trunc) << "plain text, not HDF5";
  auto L = ShardLoader::Open(Opts(index, 8, 2));
  ExpectErrorNaming(L.status(), dir + "/train_0.h5");
}

TEST(DataLoaderBadInput, VocabAndTokenizerMismatchWithTheModel) {
  std::string dir = NewTempDir("mismatch");
  std::string index = MakeShards(dir, {300});
  LoaderOptions o = Opts(index, 8, 2);
  o.expected_vocab_size = 100;  // ids up to 258 would index no embedding row
  ExpectErrorNaming(ShardLoader::Open(o).status(), index, "vocab");
  o.expected_vocab_size = 32000;  // a padded embedding takes the byte tokenizer's ids
  EXPECT_TRUE(ShardLoader::Open(o).ok());
  o.expected_vocab_size = 259;
  o.expected_tokenizer = "sentencepiece:0123";
  ExpectErrorNaming(ShardLoader::Open(o).status(), index, "tokenizer");
  o.expected_tokenizer = "byte";
  EXPECT_TRUE(ShardLoader::Open(o).ok());
}

TEST(DataLoaderBadInput, ShardDisagreesWithIndex) {
  std::string dir = NewTempDir("disagree");
  std::string index = MakeShards(dir, {300, 300});
  // Replace shard 1 by one made with another vocabulary.
  std::string other = NewTempDir("disagree_other");
  MakeShards(other, {300, 300}, 512, "sentencepiece:abcd");
  fs::copy_file(other + "/train_1.h5", dir + "/train_1.h5", fs::copy_options::overwrite_existing);
  ExpectErrorNaming(ShardLoader::Open(Opts(index, 8, 2)).status(), dir + "/train_1.h5", "mismatch");
  // Or by one with a different length.
  MakeShards(other, {300, 250});
  fs::copy_file(other + "/train_1.h5", dir + "/train_1.h5", fs::copy_options::overwrite_existing);
  ExpectErrorNaming(ShardLoader::Open(Opts(index, 8, 2)).status(), dir + "/train_1.h5", "250");
}

TEST(DataLoaderBadInput, TokenIdOutOfVocabularyWhileReading) {
  std::string dir = NewTempDir("oov");
  std::string index = MakeShards(dir, {401});  // 50 windows of 8+1
  std::string shard = dir + "/train_0.h5";
  {  // Overwrite every 8th token with id 300 >= vocab 259, straight through HDF5.
    hid_t f = H5Fopen(shard.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    hid_t ds = H5Dopen2(f, "tokens", H5P_DEFAULT);
    std::vector<uint32_t> all(401);
    ASSERT_GE(H5Dread(ds, H5T_NATIVE_UINT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, all.data()), 0);
    for (size_t i = 3; i < all.size(); i += 8) all[i] = 300;
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_UINT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, all.data()), 0);
    H5Dclose(ds);
    H5Fclose(f);
  }
  for (int prefetch : {0, 2}) {
    auto L = ShardLoader::Open(Opts(index, 8, 2, 0, 1, prefetch));
    ASSERT_TRUE(L.ok()) << L.status();  // found while reading, not at open
    std::vector<int32_t> in, tg;
    LoaderCursor before = (*L)->cursor();
    absl::Status s = (*L)->Next(&in, &tg);
    ExpectErrorNaming(s, shard, "300");
    EXPECT_NE(s.message().find("vocabulary"), std::string::npos) << s;
    EXPECT_EQ((*L)->cursor(), before);                       // not skipped
    EXPECT_EQ((*L)->Next(&in, &tg).message(), s.message());  // and it stays an error
  }
}

TEST(DataLoaderBadInput, MalformedIndex) {
  std::string dir = NewTempDir("badindex");
  std::string index = MakeShards(dir, {300});
  std::string good;
  {
    std::ifstream in(index);
    good.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto with = [&](const std::string& text) {
    std::ofstream(index, std::ios::trunc) << text;
    return ShardLoader::Open(Opts(index, 8, 2)).status();
  };
  ExpectErrorNaming(with("{ not json"), index, "JSON");
  ExpectErrorNaming(with("[1, 2]"), index);
  auto j = nlohmann::json::parse(good);
  auto drop = j;
  drop.erase("shards");
  ExpectErrorNaming(with(drop.dump()), index, "shards");
  auto empty = j;
  empty["shards"] = nlohmann::json::array();
  ExpectErrorNaming(with(empty.dump()), index, "shards");
  auto str_vocab = j;
  str_vocab["vocab_size"] = "259";
  ExpectErrorNaming(with(str_vocab.dump()), index, "vocab_size");
  auto sum = j;
  sum["num_tokens"] = 301;
  ExpectErrorNaming(with(sum.dump()), index, "num_tokens");
  auto count = j;  // index and shard disagree on the count: the shard is named
  count["num_tokens"] = 299;
  count["shards"][0]["num_tokens"] = 299;
  ExpectErrorNaming(with(count.dump()), dir + "/train_0.h5", "299");
  auto nopath = j;
  nopath["shards"][0].erase("path");
  ExpectErrorNaming(with(nopath.dump()), index, "path");
  fs::remove(index);
  ExpectErrorNaming(ShardLoader::Open(Opts(index, 8, 2)).status(), index, "not found");
}

TEST(DataLoaderBadInput, TooFewWindowsAndBadOptions) {
  std::string dir = NewTempDir("few");
  std::string index = MakeShards(dir, {33});  // 4 windows of 8+1
  ExpectErrorNaming(ShardLoader::Open(Opts(index, 8, 5)).status(), index, "global batch");
  EXPECT_TRUE(ShardLoader::Open(Opts(index, 8, 4)).ok());
  EXPECT_FALSE(ShardLoader::Open(Opts(index, 0, 4)).ok());
  EXPECT_FALSE(ShardLoader::Open(Opts(index, 8, 1, 2, 2)).ok());
}

}  // namespace
}  // namespace dmc::data
