// ShardLoader: fixed-length training windows from token shards, sharded over data-parallel ranks,
// shuffled per epoch, prefetched in the background, resumable.
//
// Windows. Shard s with T_s tokens holds n_s = floor((T_s - 1) / seq_len) windows; window j of the
// shard reads tokens [j*seq_len, j*seq_len + seq_len + 1) (stride seq_len, so consecutive windows
// share one token: the last target of one is the first input of the next). Windows never cross a
// shard boundary. The windows of all shards, in index order, are numbered 0..W-1 (global ids).
//
// Order. Epoch e visits the windows in the order of a seeded pseudo-random permutation P_e of
// [0, W) (a Feistel network over the next power of four with cycle walking, keyed by seed and
// epoch: O(1) memory, identical on every platform). Global batch g of epoch e is
// P_e(g*G) .. P_e(g*G + G - 1), G = batch_size * dp_size; rank r takes the contiguous slice
// [r*B, (r+1)*B). An epoch has floor(W / G) global batches (the G-remainder is left out of that
// epoch; the permutation changes, so other windows are left out in other epochs). The union over
// ranks of a global batch is therefore the same for every dp_size with the same G.
//
// Cursor. (epoch, batch) of the next batch Next() returns, plus seed, seq_len, global batch and
// W to check that a restore matches the data and layout. All ranks hold the same cursor, and a
// cursor saved with one dp_size restores under another with the same global batch.
//
// Errors (missing/corrupt/truncated shard, index malformed, tokenizer or vocab mismatch, token id
// >= vocab while reading) are absl errors that name the file; nothing is skipped.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "data/index.h"
#include "nlohmann/json.hpp"

namespace dmc::data {

class ShardReader;

struct LoaderOptions {
  std::string index_path;
  int seq_len = 0;
  int batch_size = 0;  // windows per DP rank per batch
  int dp_rank = 0;
  int dp_size = 1;
  uint64_t seed = 0;
  int expected_vocab_size = 0;     // 0: not checked
  std::string expected_tokenizer;  // "": not checked
  int prefetch = 2;                // batches read ahead by the background thread; 0: no thread
};

struct LoaderCursor {
  int64_t epoch = 0;
  int64_t batch = 0;  // global batch index within the epoch
  // Consistency checks for Restore():
  uint64_t seed = 0;
  int seq_len = 0;
  int64_t global_batch = 0;  // windows per global batch (batch_size * dp_size)
  int64_t num_windows = 0;   // W

  nlohmann::json ToJson() const;
  static absl::StatusOr<LoaderCursor> FromJson(const nlohmann::json& j);
  std::string ToString() const;  // compact JSON
  static absl::StatusOr<LoaderCursor> FromString(const std::string& s);
  bool operator==(const LoaderCursor& o) const;
  bool operator!=(const LoaderCursor& o) const { return !(*this == o); }
};

// Bijection of [0, n) keyed by (seed, epoch).
class WindowPermutation {
 public:
  WindowPermutation(int64_t n, uint64_t seed, int64_t epoch);
  int64_t operator()(int64_t i) const;
  int64_t size() const { return n_; }

 private:
  uint64_t Round(uint64_t half, int r) const;
  int64_t n_;
  int half_bits_;
  uint64_t mask_;
  uint64_t keys_[6];
};

class ShardLoader {
 public:
  static absl::StatusOr<std::unique_ptr<ShardLoader>> Open(const LoaderOptions& options);
  ~ShardLoader();
  ShardLoader(const ShardLoader&) = delete;
  ShardLoader& operator=(const ShardLoader&) = delete;

  // Fills batch_size x seq_len inputs and targets (targets = inputs shifted by one token) and
  // advances the cursor. On error the cursor stays and the same error is returned again.
  absl::Status Next(std::vector<int32_t>* inputs, std::vector<int32_t>* targets);
  // Cursor of the next batch Next() will return.
  LoaderCursor cursor() const;
  // Continues from `c` (saved by any loader on the same index, seq_len, seed and global batch).
  absl::Status Restore(const LoaderCursor& c);

  int64_t windows_per_epoch() const { return num_windows_; }        // W
  int64_t batches_per_epoch() const { return batches_per_epoch_; }  // floor(W / global_batch)
  int64_t global_batch() const { return global_batch_; }
  const ShardIndex& index() const { return index_; }
  const LoaderOptions& options() const { return opt_; }

  // Global window ids that this rank's batch (epoch, batch) holds, in order.
  std::vector<int64_t> WindowIds(int64_t epoch, int64_t batch) const;
  // Shard number and token offset of global window `id`.
  std::pair<int, int64_t> WindowLocation(int64_t id) const;

 private:
  struct Item {
    int64_t epoch = 0, batch = 0;
    absl::Status status;
    std::vector<int32_t> inputs, targets;
  };

  ShardLoader() = default;
  absl::Status ReadBatch(int64_t epoch, int64_t batch, std::vector<int32_t>* inputs,
                         std::vector<int32_t>* targets);
  absl::StatusOr<ShardReader*> Reader(int shard);
  void StartThread();
  void StopThread();
  void ThreadMain(int64_t epoch, int64_t batch);

  LoaderOptions opt_;
  std::string index_path_;
  ShardIndex index_;
  std::vector<int64_t> window_start_;  // prefix sums of windows per shard (size shards + 1)
  int64_t num_windows_ = 0, global_batch_ = 0, batches_per_epoch_ = 0;

  // Open shard readers (LRU, touched only by the thread that reads batches).
  std::vector<std::unique_ptr<ShardReader>> readers_;
  std::deque<int> open_order_;
  std::vector<uint32_t> scratch_;

  // Consumer position.
  int64_t epoch_ = 0, batch_ = 0;

  // Prefetch.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace dmc::data
