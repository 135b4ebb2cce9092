// ShardLoader throughput: tokens/s delivered to the trainer, on one core.
//
// Writes synthetic shards (uniform random byte-tokenizer ids) to a temp folder, then times
// ShardLoader::Next over shuffled windows for several (seq_len, batch) shapes. prefetch=0 reads in
// the calling thread (the one-core number); prefetch=2 shows what the trainer sees when the
// background thread has a core of its own. Files are in the OS page cache after writing, so this
// measures the HDF5 hyperslab path and the loader, not the disk.
//
//   bench_loader [--tokens=33554432] [--shard_tokens=8388608] [--seconds=1.0] [--dir=/tmp]
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "data/index.h"
#include "data/loader.h"
#include "data/shard.h"

ABSL_FLAG(int64_t, tokens, int64_t{1} << 25, "synthetic tokens to write");
ABSL_FLAG(int64_t, shard_tokens, int64_t{1} << 23, "tokens per shard");
ABSL_FLAG(double, seconds, 1.0, "time per configuration");
ABSL_FLAG(std::string, dir, "", "folder for the synthetic shards (default: system temp)");

namespace {

using dmc::data::LoaderOptions;
using dmc::data::ShardIndex;
using dmc::data::ShardLoader;
using dmc::data::ShardMeta;
using dmc::data::ShardWriter;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "bench_loader: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  namespace fs = std::filesystem;
  const int64_t total = absl::GetFlag(FLAGS_tokens), per_shard = absl::GetFlag(FLAGS_shard_tokens);
  fs::path dir =
      absl::GetFlag(FLAGS_dir).empty() ? fs::temp_directory_path() : fs::path(absl::GetFlag(FLAGS_dir));
  dir /= "dmc_bench_loader_" + std::to_string(::getpid());
  fs::create_directories(dir);

  // Synthetic shards.
  auto t0 = std::chrono::steady_clock::now();
  ShardIndex idx;
  idx.split = "train";
  idx.tokenizer = "byte";
  idx.vocab_size = 259;
  idx.bos_id = 256;
  idx.eos_id = 257;
  uint64_t x = 88172645463325252ULL;
  std::vector<int32_t> buf(1 << 20);
  for (int64_t done = 0, s = 0; done < total; ++s) {
    int64_t n = std::min(per_shard, total - done);
    std::string name = absl::StrFormat("train_%06d.h5", s);
    ShardMeta m;
    m.tokenizer = "byte";
    m.vocab_size = 259;
    m.bos_id = 256;
    m.eos_id = 257;
    auto w = ShardWriter::Create((dir / name).string(), m);
    if (!w.ok()) return Fail(w.status());
    for (int64_t k = 0; k < n;) {
      int64_t c = std::min<int64_t>(n - k, static_cast<int64_t>(buf.size()));
      for (int64_t i = 0; i < c; ++i) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        buf[i] = static_cast<int32_t>(x % 256);
      }
      absl::Status st = (*w)->Append(buf.data(), c, k == 0);
      if (!st.ok()) return Fail(st);
      k += c;
    }
    absl::Status st = (*w)->Close();
    if (!st.ok()) return Fail(st);
    idx.shards.push_back({name, "", n, 1});
    idx.num_tokens += n;
    done += n;
  }
  idx.num_documents = static_cast<int64_t>(idx.shards.size());
  const std::string index_path = (dir / "train_index.json").string();
  absl::Status st = dmc::data::WriteIndex(index_path, idx);
  if (!st.ok()) return Fail(st);
  double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "ShardLoader throughput: %lld tokens in %zu shards (written at %.1f M tokens/s), %.1f s per row\n\n",
      static_cast<long long>(total), idx.shards.size(), total / write_s / 1e6, absl::GetFlag(FLAGS_seconds));

  std::printf("| seq_len | batch | prefetch | batches | M tokens/s | MB/s read | us/window |\n");
  std::printf("|--------:|------:|---------:|--------:|-----------:|----------:|----------:|\n");
  const double budget = absl::GetFlag(FLAGS_seconds);
  for (int seq_len : {128, 1024, 4096}) {
    for (int batch : {8, 32}) {
      for (int prefetch : {0, 2}) {
        LoaderOptions o;
        o.index_path = index_path;
        o.seq_len = seq_len;
        o.batch_size = batch;
        o.seed = 1;
        o.prefetch = prefetch;
        auto L = ShardLoader::Open(o);
        if (!L.ok()) return Fail(L.status());
        std::vector<int32_t> in, tg;
        int64_t batches = 0;
        auto start = std::chrono::steady_clock::now();
        double secs = 0;
        do {
          st = (*L)->Next(&in, &tg);
          if (!st.ok()) return Fail(st);
          ++batches;
          secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        } while (secs < budget);
        double toks = static_cast<double>(batches) * batch * seq_len;
        double windows = static_cast<double>(batches) * batch;
        std::printf("| %7d | %5d | %8d | %7lld | %10.1f | %9.1f | %9.2f |\n", seq_len, batch, prefetch,
                    static_cast<long long>(batches), toks / secs / 1e6,
                    windows * (seq_len + 1) * 4 / secs / 1e6, secs / windows * 1e6);
      }
    }
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  return 0;
}
