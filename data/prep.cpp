#include "data/prep.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <sstream>
#include <string_view>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "data/index.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "nlohmann/json.hpp"

namespace dmc::data {
namespace {

namespace fs = std::filesystem;

struct InputFile {
  std::string path;
  bool jsonl = false;
};

bool HasExt(const fs::path& p, const char* ext) { return p.extension() == ext; }

absl::Status ListInputs(const std::vector<std::string>& inputs, std::vector<InputFile>* files,
                        std::vector<std::string>* ignored) {
  if (inputs.empty()) return absl::InvalidArgumentError("no --input given");
  for (const std::string& in : inputs) {
    std::error_code ec;
    fs::path p(in);
    if (!fs::exists(p, ec)) return absl::NotFoundError(absl::StrCat(in, ": no such file or directory"));
    if (fs::is_directory(p, ec)) {
      std::vector<std::string> found;
      for (auto it = fs::recursive_directory_iterator(p, ec); !ec && it != fs::recursive_directory_iterator();
           it.increment(ec)) {
        if (!it->is_regular_file()) continue;
        const fs::path& f = it->path();
        if (HasExt(f, ".txt") || HasExt(f, ".jsonl"))
          found.push_back(f.string());
        else
          ignored->push_back(f.string());
      }
      if (ec) return absl::UnavailableError(absl::StrCat(in, ": cannot list directory: ", ec.message()));
      if (found.empty())
        return absl::NotFoundError(absl::StrCat(in, ": directory holds no .txt or .jsonl file"));
      std::sort(found.begin(), found.end());
      for (auto& f : found) files->push_back({f, HasExt(f, ".jsonl")});
    } else {
      if (HasExt(p, ".txt"))
        files->push_back({in, false});
      else if (HasExt(p, ".jsonl"))
        files->push_back({in, true});
      else
        return absl::InvalidArgumentError(absl::StrCat(in, ": unsupported input type (want .txt or .jsonl)"));
    }
  }
  return absl::OkStatus();
}

// Reads documents in input order, a batch of about `batch_bytes` at a time.
class DocReader {
 public:
  DocReader(std::vector<InputFile> files, std::string text_field)
      : files_(std::move(files)), field_(std::move(text_field)) {}

  // Appends documents to *docs until about batch_bytes are read or the inputs end.
  absl::Status ReadBatch(size_t batch_bytes, std::vector<std::string>* docs, int64_t* bytes) {
    size_t got = 0;
    while (got < batch_bytes && file_ < files_.size()) {
      const InputFile& f = files_[file_];
      if (!f.jsonl) {
        std::ifstream in(f.path, std::ios::binary);
        if (!in) return absl::UnavailableError(absl::StrCat(f.path, ": cannot read"));
        std::stringstream ss;
        ss << in.rdbuf();
        if (in.bad()) return absl::DataLossError(absl::StrCat(f.path, ": read error"));
        std::string text = ss.str();
        *bytes += static_cast<int64_t>(text.size());
        got += text.size();
        docs->push_back(std::move(text));
        ++file_;
        continue;
      }
      if (!jsonl_) {
        jsonl_ = std::make_unique<std::ifstream>(f.path, std::ios::binary);
        line_no_ = 0;
        if (!*jsonl_) return absl::UnavailableError(absl::StrCat(f.path, ": cannot read"));
      }
      std::string line;
      while (got < batch_bytes && std::getline(*jsonl_, line)) {
        ++line_no_;
        *bytes += static_cast<int64_t>(line.size()) + 1;
        got += line.size() + 1;
        if (line.find_first_not_of(" \t\r\n") == std::string::npos) continue;
        nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded())
          return absl::InvalidArgumentError(absl::StrCat(f.path, ":", line_no_, ": invalid JSON"));
        if (!j.is_object())
          return absl::InvalidArgumentError(absl::StrCat(f.path, ":", line_no_, ": expected a JSON object"));
        auto it = j.find(field_);
        if (it == j.end() || !it->is_string())
          return absl::InvalidArgumentError(
              absl::StrCat(f.path, ":", line_no_, ": no string field '", field_, "'"));
        docs->push_back(it->get<std::string>());
      }
      if (got < batch_bytes) {  // the loop ended on EOF (or an error)
        if (jsonl_->bad()) return absl::DataLossError(absl::StrCat(f.path, ": read error"));
        jsonl_.reset();
        ++file_;
      }
    }
    return absl::OkStatus();
  }

 private:
  std::vector<InputFile> files_;
  std::string field_;
  size_t file_ = 0;
  std::unique_ptr<std::ifstream> jsonl_;
  int64_t line_no_ = 0;
};

// Writes one split's shards and index.
class SplitWriter {
 public:
  SplitWriter(std::string dir, std::string split, const Tokenizer& tok, const PrepOptions& o)
      : dir_(std::move(dir)), split_(std::move(split)), o_(o) {
    index_.split = split_;
    index_.tokenizer = tok.name();
    index_.vocab_size = tok.vocab_size();
    index_.bos_id = tok.bos_id();
    index_.eos_id = tok.eos_id();
  }

  absl::Status AddDocument(const std::vector<int32_t>& tokens) {
    ++index_.num_documents;
    int64_t n = static_cast<int64_t>(tokens.size()), done = 0;
    bool first = true;
    while (done < n) {
      if (cur_ == nullptr) {
        absl::Status s = OpenShard(/*continues=*/!first);
        if (!s.ok()) return s;
      }
      int64_t take = std::min(n - done, o_.shard_tokens - cur_->num_tokens());
      // Each piece opens a segment in its shard; a piece after the first continues the document.
      absl::Status s = cur_->Append(tokens.data() + done, take, /*starts_segment=*/true);
      if (!s.ok()) return s;
      done += take;
      first = false;
      if (cur_->num_tokens() >= o_.shard_tokens) {
        s = CloseShard();
        if (!s.ok()) return s;
      }
    }
    return absl::OkStatus();
  }

  // Closes the last shard and writes the index; returns the index path ("" if the split is empty).
  absl::StatusOr<std::string> Finish() {
    if (cur_ != nullptr) {
      absl::Status s = CloseShard();
      if (!s.ok()) return s;
    }
    if (index_.shards.empty()) return std::string();
    std::string path = (fs::path(dir_) / (split_ + "_index.json")).string();
    absl::Status s = WriteIndex(path, index_);
    if (!s.ok()) return s;
    return path;
  }

  const ShardIndex& index() const { return index_; }

 private:
  absl::Status OpenShard(bool continues) {
    std::string name = absl::StrFormat("%s_%06d.h5", split_, index_.shards.size());
    ShardMeta meta;
    meta.tokenizer = index_.tokenizer;
    meta.vocab_size = index_.vocab_size;
    meta.bos_id = index_.bos_id;
    meta.eos_id = index_.eos_id;
    auto w = ShardWriter::Create((fs::path(dir_) / name).string(), meta,
                                 std::min(o_.chunk_tokens, o_.shard_tokens));
    if (!w.ok()) return w.status();
    cur_ = std::move(*w);
    cur_->set_continues_document(continues);
    cur_name_ = name;
    return absl::OkStatus();
  }

  absl::Status CloseShard() {
    ShardEntry e;
    e.path = cur_name_;
    e.num_tokens = cur_->num_tokens();
    e.num_segments = cur_->num_segments();
    absl::Status s = cur_->Close();
    if (!s.ok()) return s;
    cur_.reset();
    index_.num_tokens += e.num_tokens;
    index_.shards.push_back(std::move(e));
    return absl::OkStatus();
  }

  std::string dir_, split_;
  const PrepOptions& o_;
  ShardIndex index_;
  std::unique_ptr<ShardWriter> cur_;
  std::string cur_name_;
};

struct Batch {
  std::vector<std::string> docs;
  std::vector<std::vector<int32_t>> tokens;
};

void TokenizeBatch(const Tokenizer& tok, int threads, Batch* b) {
  b->tokens.assign(b->docs.size(), {});
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < b->docs.size();) b->tokens[i] = tok.Encode(b->docs[i]);
  };
  int n = std::max(1, std::min<int>(threads, static_cast<int>(b->docs.size())));
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// Our own output names: {train,val}_NNNNNN.h5[.tmp] and {train,val}_index.json[.tmp].
bool IsOurOutput(const std::string& name) {
  for (const char* split : {"train_", "val_"}) {
    std::string_view n(name), p(split);
    if (n.substr(0, p.size()) != p) continue;
    n.remove_prefix(p.size());
    if (n == "index.json" || n == "index.json.tmp") return true;
    if (n.size() < 9 || n.substr(6, 3) != ".h5") continue;
    if (!std::all_of(n.begin(), n.begin() + 6, [](char c) { return c >= '0' && c <= '9'; })) continue;
    n.remove_prefix(9);
    return n.empty() || n == ".tmp";
  }
  return false;
}

// Removes shards and indexes a previous run left in dir (our own names only), so that no stale
// shard sits next to the new index.
void RemoveOldOutputs(const std::string& dir) {
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec))
    if (it->is_regular_file() && IsOurOutput(it->path().filename().string())) fs::remove(it->path(), ec);
}

}  // namespace

absl::StatusOr<PrepResult> RunPrep(const PrepOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  if (o.output_dir.empty()) return absl::InvalidArgumentError("no --output directory given");
  if (o.shard_tokens <= 0)
    return absl::InvalidArgumentError(absl::StrCat("--shard_tokens must be > 0, got ", o.shard_tokens));
  if (!(o.val_fraction >= 0.0 && o.val_fraction < 1.0))
    return absl::InvalidArgumentError(absl::StrCat("--val_fraction must be in [0, 1), got ", o.val_fraction));
  auto tok_or = LoadTokenizer(o.tokenizer);
  if (!tok_or.ok()) return tok_or.status();
  const Tokenizer& tok = **tok_or;
  if (tok.eos_id() < 0 || tok.eos_id() >= tok.vocab_size())
    return absl::InvalidArgumentError(
        absl::StrCat(o.tokenizer, ": tokenizer has no EOS id (needed between documents)"));
  if (o.add_bos && (tok.bos_id() < 0 || tok.bos_id() >= tok.vocab_size()))
    return absl::InvalidArgumentError(absl::StrCat(o.tokenizer, ": tokenizer has no BOS id"));

  std::vector<InputFile> files;
  std::vector<std::string> ignored;
  absl::Status s = ListInputs(o.inputs, &files, &ignored);
  if (!s.ok()) return s;

  std::error_code ec;
  fs::create_directories(o.output_dir, ec);
  if (ec)
    return absl::UnavailableError(absl::StrCat(o.output_dir, ": cannot create directory: ", ec.message()));
  RemoveOldOutputs(o.output_dir);

  PrepResult r;
  r.files = static_cast<int64_t>(files.size());
  r.ignored_files = static_cast<int64_t>(ignored.size());
  const int threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  const int64_t val_ppm = std::llround(o.val_fraction * 1e6);
  SplitWriter train(o.output_dir, "train", tok, o), val(o.output_dir, "val", tok, o);
  DocReader reader(files, o.text_field);

  auto last_print = t0;
  int64_t done_bytes = 0, done_tokens = 0;  // of the documents written so far
  // Ends a half-written progress line whichever way RunPrep returns.
  struct LineCloser {
    bool open = false;
    ~LineCloser() {
      if (open) std::fputc('\n', stderr);
    }
  } line;
  auto progress = [&](bool final) {
    if (!o.progress) return;
    auto now = std::chrono::steady_clock::now();
    if (!final && now - last_print < std::chrono::milliseconds(500)) return;
    last_print = now;
    double secs = std::max(1e-9, std::chrono::duration<double>(now - t0).count());
    const int64_t toks = done_tokens;
    std::fprintf(stderr,
                 "\rdmc-prep: %.1f MB done, %.2f MB/s | %lld tokens, %.3g tokens/s | %lld docs | %.1f s%s",
                 done_bytes / 1e6, done_bytes / 1e6 / secs, static_cast<long long>(toks), toks / secs,
                 static_cast<long long>(r.documents), secs, final ? "\n" : "");
    line.open = !final;
    std::fflush(stderr);
  };

  auto write_batch = [&](Batch& b) -> absl::Status {
    for (size_t i = 0; i < b.docs.size(); ++i) {
      std::vector<int32_t>& t = b.tokens[i];
      done_bytes += static_cast<int64_t>(b.docs[i].size());
      if (b.docs[i].empty() || t.empty()) {  // nothing to learn from; counted in the summary
        ++r.empty_documents;
        continue;
      }
      if (o.add_bos) t.insert(t.begin(), tok.bos_id());
      t.push_back(tok.eos_id());
      int64_t d = r.documents++;
      bool to_val = (d + 1) * val_ppm / 1000000 > d * val_ppm / 1000000;
      absl::Status st = to_val ? val.AddDocument(t) : train.AddDocument(t);
      if (!st.ok()) return st;
      done_tokens += static_cast<int64_t>(t.size());
      progress(false);
    }
    return absl::OkStatus();
  };

  // Pipeline: read batch k+1 and write batch k-1 while batch k is tokenized.
  const size_t batch_bytes = static_cast<size_t>(threads) * (4u << 20);
  std::future<Batch> pending;
  for (;;) {
    Batch next;
    s = reader.ReadBatch(batch_bytes, &next.docs, &r.bytes);
    if (!s.ok()) return s;
    Batch done;
    bool have_done = false;
    if (pending.valid()) {
      done = pending.get();
      have_done = true;
    }
    if (!next.docs.empty())
      pending = std::async(std::launch::async, [&tok, threads, b = std::move(next)]() mutable {
        TokenizeBatch(tok, threads, &b);
        return std::move(b);
      });
    if (have_done) {
      s = write_batch(done);
      if (!s.ok()) return s;
    }
    if (!pending.valid()) break;
  }

  auto train_path = train.Finish();
  if (!train_path.ok()) return train_path.status();
  auto val_path = val.Finish();
  if (!val_path.ok()) return val_path.status();
  if (train_path->empty())
    return absl::InvalidArgumentError(absl::StrCat(
        "no training tokens: the inputs (", absl::StrJoin(o.inputs, ", "), ") hold no non-empty document"));
  if (val_ppm > 0 && val_path->empty())
    return absl::InvalidArgumentError(
        absl::StrFormat("--val_fraction=%g selects no document out of %d; raise it or add documents",
                        o.val_fraction, r.documents));
  r.train_index = *train_path;
  r.val_index = *val_path;
  r.train_documents = train.index().num_documents;
  r.val_documents = val.index().num_documents;
  r.train_tokens = train.index().num_tokens;
  r.val_tokens = val.index().num_tokens;
  r.train_shards = static_cast<int64_t>(train.index().shards.size());
  r.val_shards = static_cast<int64_t>(val.index().shards.size());
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  progress(true);
  if (o.progress) {
    std::fprintf(stderr,
                 "dmc-prep: %lld files, %lld documents (%lld empty, skipped) with tokenizer %s (vocab %d)\n",
                 static_cast<long long>(r.files), static_cast<long long>(r.documents),
                 static_cast<long long>(r.empty_documents), tok.name().c_str(), tok.vocab_size());
    std::fprintf(stderr, "dmc-prep: train: %lld docs, %lld tokens, %lld shards -> %s\n",
                 static_cast<long long>(r.train_documents), static_cast<long long>(r.train_tokens),
                 static_cast<long long>(r.train_shards), r.train_index.c_str());
    if (!r.val_index.empty())
      std::fprintf(stderr, "dmc-prep: val:   %lld docs, %lld tokens, %lld shards -> %s\n",
                   static_cast<long long>(r.val_documents), static_cast<long long>(r.val_tokens),
                   static_cast<long long>(r.val_shards), r.val_index.c_str());
    if (!ignored.empty()) {
      std::vector<std::string> shown(ignored.begin(), ignored.begin() + std::min<size_t>(ignored.size(), 5));
      std::fprintf(stderr, "dmc-prep: ignored %zu file(s) that are not .txt/.jsonl: %s%s\n", ignored.size(),
                   absl::StrJoin(shown, ", ").c_str(), ignored.size() > 5 ? ", ..." : "");
    }
  }
  return r;
}

}  // namespace dmc::data
