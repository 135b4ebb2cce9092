#include "data/loader.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "data/shard.h"

namespace dmc::data {
namespace {

constexpr size_t kMaxOpenShards = 16;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// LoaderCursor

nlohmann::json LoaderCursor::ToJson() const {
  return nlohmann::json{{"epoch", epoch},
                        {"batch", batch},
                        {"seed", seed},
                        {"seq_len", seq_len},
                        {"global_batch", global_batch},
                        {"num_windows", num_windows}};
}

absl::StatusOr<LoaderCursor> LoaderCursor::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("loader cursor: expected a JSON object");
  LoaderCursor c;
  auto get = [&](const char* key, auto* dst) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end())
      return absl::InvalidArgumentError(absl::StrCat("loader cursor: missing field '", key, "'"));
    if (!it->is_number_integer())
      return absl::InvalidArgumentError(absl::StrCat("loader cursor: field '", key, "' must be an integer"));
    *dst = it->get<std::remove_pointer_t<decltype(dst)>>();
    return absl::OkStatus();
  };
  for (absl::Status s :
       {get("epoch", &c.epoch), get("batch", &c.batch), get("seed", &c.seed), get("seq_len", &c.seq_len),
        get("global_batch", &c.global_batch), get("num_windows", &c.num_windows)})
    if (!s.ok()) return s;
  if (c.epoch < 0 || c.batch < 0) return absl::InvalidArgumentError("loader cursor: negative epoch or batch");
  return c;
}

std::string LoaderCursor::ToString() const { return ToJson().dump(); }

absl::StatusOr<LoaderCursor> LoaderCursor::FromString(const std::string& s) {
  nlohmann::json j = nlohmann::json::parse(s, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat("loader cursor: not valid JSON: ", s));
  return FromJson(j);
}

bool LoaderCursor::operator==(const LoaderCursor& o) const {
  return epoch == o.epoch && batch == o.batch && seed == o.seed && seq_len == o.seq_len &&
         global_batch == o.global_batch && num_windows == o.num_windows;
}

// ---------------------------------------------------------------------------------------------
// WindowPermutation: a 6-round balanced Feistel network on 2*h bits (4^h >= n), cycle-walked
// into [0, n). Each walk step stays in the domain; since 4^h < 4n, the expected number of steps
// is below 4.

WindowPermutation::WindowPermutation(int64_t n, uint64_t seed, int64_t epoch) : n_(n) {
  half_bits_ = 1;
  while ((int64_t{1} << (2 * half_bits_)) < n) ++half_bits_;
  mask_ = (uint64_t{1} << half_bits_) - 1;
  uint64_t k = SplitMix64(seed ^ 0x6a09e667f3bcc909ULL);
  k = SplitMix64(k ^ static_cast<uint64_t>(epoch));
  for (int r = 0; r < 6; ++r) {
    k = SplitMix64(k + static_cast<uint64_t>(r));
    keys_[r] = k;
  }
}

uint64_t WindowPermutation::Round(uint64_t half, int r) const { return SplitMix64(half ^ keys_[r]) & mask_; }

int64_t WindowPermutation::operator()(int64_t i) const {
  uint64_t x = static_cast<uint64_t>(i);
  do {
    uint64_t l = x >> half_bits_, r = x & mask_;
    for (int k = 0; k < 6; ++k) {
      uint64_t nl = r;
      r = l ^ Round(r, k);
      l = nl;
    }
    x = (l << half_bits_) | r;
  } while (x >= static_cast<uint64_t>(n_));
  return static_cast<int64_t>(x);
}

// ---------------------------------------------------------------------------------------------
// ShardLoader

absl::StatusOr<std::unique_ptr<ShardLoader>> ShardLoader::Open(const LoaderOptions& o) {
  const std::string& ip = o.index_path;
  if (o.seq_len <= 0)
    return absl::InvalidArgumentError(absl::StrCat(ip, ": seq_len must be > 0, got ", o.seq_len));
  if (o.batch_size <= 0)
    return absl::InvalidArgumentError(absl::StrCat(ip, ": batch_size must be > 0, got ", o.batch_size));
  if (o.dp_size <= 0 || o.dp_rank < 0 || o.dp_rank >= o.dp_size)
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: bad dp_rank %d / dp_size %d", ip, o.dp_rank, o.dp_size));
  if (o.prefetch < 0) return absl::InvalidArgumentError(absl::StrCat(ip, ": prefetch must be >= 0"));
  auto idx = ReadIndex(ip);
  if (!idx.ok()) return idx.status();

  std::unique_ptr<ShardLoader> L(new ShardLoader);
  L->opt_ = o;
  L->index_path_ = ip;
  L->index_ = std::move(*idx);
  const ShardIndex& x = L->index_;
  // A model may pad its embedding past the tokenizer's vocabulary; ids past the model's own
  // vocabulary would index no embedding row.
  if (o.expected_vocab_size > 0 && x.vocab_size > o.expected_vocab_size)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: vocabulary mismatch: the shards have vocab_size %d, more than the model's %d", ip,
        x.vocab_size, o.expected_vocab_size));
  if (!o.expected_tokenizer.empty() && x.tokenizer != o.expected_tokenizer)
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: tokenizer mismatch: the shards were made with '%s', the model expects '%s'", ip,
                        x.tokenizer, o.expected_tokenizer));

  // Open every shard once: catches missing, corrupt and truncated files before training starts.
  L->readers_.resize(x.shards.size());
  L->window_start_.assign(x.shards.size() + 1, 0);
  for (size_t i = 0; i < x.shards.size(); ++i) {
    const ShardEntry& e = x.shards[i];
    auto r = ShardReader::Open(e.resolved_path);
    if (!r.ok()) return r.status();
    const ShardMeta& m = (*r)->meta();
    if (m.num_tokens != e.num_tokens)
      return absl::DataLossError(
          absl::StrFormat("%s: holds %d tokens but %s lists %d (truncated or replaced shard?)",
                          e.resolved_path, m.num_tokens, ip, e.num_tokens));
    if (m.tokenizer != x.tokenizer)
      return absl::FailedPreconditionError(
          absl::StrFormat("%s: tokenizer mismatch: shard says '%s', %s says '%s'", e.resolved_path,
                          m.tokenizer, ip, x.tokenizer));
    if (m.vocab_size != x.vocab_size || m.bos_id != x.bos_id || m.eos_id != x.eos_id)
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: vocabulary mismatch: shard has vocab_size %d (bos %d, eos %d), %s has %d (bos %d, eos %d)",
          e.resolved_path, m.vocab_size, m.bos_id, m.eos_id, ip, x.vocab_size, x.bos_id, x.eos_id));
    int64_t n = m.num_tokens >= 1 ? (m.num_tokens - 1) / o.seq_len : 0;
    L->window_start_[i + 1] = L->window_start_[i] + n;
    if (L->open_order_.size() < kMaxOpenShards) {
      L->readers_[i] = std::move(*r);
      L->open_order_.push_back(static_cast<int>(i));
    }
  }
  L->num_windows_ = L->window_start_.back();
  L->global_batch_ = static_cast<int64_t>(o.batch_size) * o.dp_size;
  if (L->num_windows_ < L->global_batch_)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: %d tokens in %d shard(s) give %d windows of %d+1 tokens, fewer than one global batch of %d", ip,
        x.num_tokens, x.shards.size(), L->num_windows_, o.seq_len, L->global_batch_));
  L->batches_per_epoch_ = L->num_windows_ / L->global_batch_;
  L->StartThread();
  return L;
}

ShardLoader::~ShardLoader() {
  StopThread();
  readers_.clear();
}

std::pair<int, int64_t> ShardLoader::WindowLocation(int64_t id) const {
  auto it = std::upper_bound(window_start_.begin(), window_start_.end(), id);
  int s = static_cast<int>(it - window_start_.begin()) - 1;
  return {s, (id - window_start_[s]) * opt_.seq_len};
}

std::vector<int64_t> ShardLoader::WindowIds(int64_t epoch, int64_t batch) const {
  WindowPermutation perm(num_windows_, opt_.seed, epoch);
  std::vector<int64_t> ids(static_cast<size_t>(opt_.batch_size));
  int64_t base = batch * global_batch_ + static_cast<int64_t>(opt_.dp_rank) * opt_.batch_size;
  for (int b = 0; b < opt_.batch_size; ++b) ids[b] = perm(base + b);
  return ids;
}

absl::StatusOr<ShardReader*> ShardLoader::Reader(int shard) {
  if (readers_[shard] != nullptr) return readers_[shard].get();
  if (open_order_.size() >= kMaxOpenShards) {
    readers_[open_order_.front()].reset();
    open_order_.pop_front();
  }
  auto r = ShardReader::Open(index_.shards[shard].resolved_path);
  if (!r.ok()) return r.status();
  if ((*r)->meta().num_tokens != index_.shards[shard].num_tokens)
    return absl::DataLossError(absl::StrFormat("%s: holds %d tokens but %s lists %d (shard changed on disk?)",
                                               (*r)->path(), (*r)->meta().num_tokens, index_path_,
                                               index_.shards[shard].num_tokens));
  readers_[shard] = std::move(*r);
  open_order_.push_back(shard);
  return readers_[shard].get();
}

absl::Status ShardLoader::ReadBatch(int64_t epoch, int64_t batch, std::vector<int32_t>* inputs,
                                    std::vector<int32_t>* targets) {
  const int T = opt_.seq_len, B = opt_.batch_size;
  inputs->resize(static_cast<size_t>(B) * T);
  targets->resize(static_cast<size_t>(B) * T);
  scratch_.resize(static_cast<size_t>(T) + 1);
  const uint32_t vocab = static_cast<uint32_t>(index_.vocab_size);
  std::vector<int64_t> ids = WindowIds(epoch, batch);
  for (int b = 0; b < B; ++b) {
    auto [shard, offset] = WindowLocation(ids[b]);
    auto r = Reader(shard);
    if (!r.ok()) return r.status();
    absl::Status s = (*r)->Read(offset, T + 1, scratch_.data());
    if (!s.ok()) return s;
    for (int t = 0; t <= T; ++t)
      if (scratch_[t] >= vocab)
        return absl::DataLossError(
            absl::StrFormat("%s: token id %d at offset %d is outside the vocabulary [0, %d) of %s",
                            (*r)->path(), scratch_[t], offset + t, vocab, index_path_));
    int32_t* in = inputs->data() + static_cast<size_t>(b) * T;
    int32_t* tg = targets->data() + static_cast<size_t>(b) * T;
    for (int t = 0; t < T; ++t) {
      in[t] = static_cast<int32_t>(scratch_[t]);
      tg[t] = static_cast<int32_t>(scratch_[t + 1]);
    }
  }
  return absl::OkStatus();
}

void ShardLoader::StartThread() {
  if (opt_.prefetch == 0) return;
  stop_ = false;
  thread_ = std::thread(&ShardLoader::ThreadMain, this, epoch_, batch_);
}

void ShardLoader::StopThread() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  std::lock_guard<std::mutex> l(mu_);
  queue_.clear();
}

void ShardLoader::ThreadMain(int64_t epoch, int64_t batch) {
  for (;;) {
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || static_cast<int>(queue_.size()) < opt_.prefetch; });
      if (stop_) return;
    }
    Item item;
    item.epoch = epoch;
    item.batch = batch;
    item.status = ReadBatch(epoch, batch, &item.inputs, &item.targets);
    const bool failed = !item.status.ok();
    {
      std::lock_guard<std::mutex> l(mu_);
      queue_.push_back(std::move(item));
    }
    cv_.notify_all();
    if (failed) {  // park: Next() keeps returning the error until Restore() or destruction
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_; });
      return;
    }
    if (++batch == batches_per_epoch_) {
      batch = 0;
      ++epoch;
    }
  }
}

absl::Status ShardLoader::Next(std::vector<int32_t>* inputs, std::vector<int32_t>* targets) {
  if (opt_.prefetch == 0) {
    absl::Status s = ReadBatch(epoch_, batch_, inputs, targets);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> l(mu_);
    if (++batch_ == batches_per_epoch_) {
      batch_ = 0;
      ++epoch_;
    }
    return absl::OkStatus();
  }
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !queue_.empty(); });
  Item& item = queue_.front();
  if (!item.status.ok()) return item.status;
  if (item.epoch != epoch_ || item.batch != batch_)  // cannot happen; guards the invariant
    return absl::InternalError(absl::StrFormat("%s: prefetch out of order (have %d/%d, want %d/%d)",
                                               index_path_, item.epoch, item.batch, epoch_, batch_));
  inputs->swap(item.inputs);
  targets->swap(item.targets);
  queue_.pop_front();
  if (++batch_ == batches_per_epoch_) {
    batch_ = 0;
    ++epoch_;
  }
  l.unlock();
  cv_.notify_all();
  return absl::OkStatus();
}

LoaderCursor ShardLoader::cursor() const {
  LoaderCursor c;
  {
    std::lock_guard<std::mutex> l(mu_);
    c.epoch = epoch_;
    c.batch = batch_;
  }
  c.seed = opt_.seed;
  c.seq_len = opt_.seq_len;
  c.global_batch = global_batch_;
  c.num_windows = num_windows_;
  return c;
}

absl::Status ShardLoader::Restore(const LoaderCursor& c) {
  auto mismatch = [&](const char* what, auto have, auto want) {
    return absl::FailedPreconditionError(absl::StrCat(index_path_, ": cannot restore loader cursor: ", what,
                                                      " is ", have, " in the cursor but ", want, " here"));
  };
  if (c.seed != opt_.seed) return mismatch("seed", c.seed, opt_.seed);
  if (c.seq_len != opt_.seq_len) return mismatch("seq_len", c.seq_len, opt_.seq_len);
  if (c.global_batch != global_batch_)
    return mismatch("global batch (batch_size*dp_size)", c.global_batch, global_batch_);
  if (c.num_windows != num_windows_) return mismatch("the number of windows", c.num_windows, num_windows_);
  if (c.epoch < 0 || c.batch < 0 || c.batch >= batches_per_epoch_)
    return absl::InvalidArgumentError(absl::StrFormat("%s: loader cursor batch %d outside [0, %d)",
                                                      index_path_, c.batch, batches_per_epoch_));
  StopThread();
  {
    std::lock_guard<std::mutex> l(mu_);
    epoch_ = c.epoch;
    batch_ = c.batch;
  }
  StartThread();
  return absl::OkStatus();
}

}  // namespace dmc::data
