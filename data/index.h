// The shard index: one JSON file per split (train_index.json, val_index.json) listing the shards,
// their token counts and the tokenizer they were made with.
//
// {
//   "format": "dmc-shard-index", "version": 1, "split": "train",
//   "tokenizer": "byte", "vocab_size": 259, "bos_id": 256, "eos_id": 257,
//   "num_tokens": 123456, "num_documents": 38,
//   "shards": [ {"path": "train_000000.h5", "num_tokens": 65536, "num_segments": 3}, ... ]
// }
//
// Shard paths are relative to the index file's folder (absolute paths are kept as they are).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace dmc::data {

struct ShardEntry {
  std::string path;           // as written in the index
  std::string resolved_path;  // filled by ReadIndex: path joined to the index's folder
  int64_t num_tokens = 0;
  int64_t num_segments = 0;  // document segments in the shard
};

struct ShardIndex {
  std::string split;
  std::string tokenizer;
  int64_t vocab_size = 0;
  int64_t bos_id = -1;
  int64_t eos_id = -1;
  int64_t num_tokens = 0;
  int64_t num_documents = 0;
  std::vector<ShardEntry> shards;

  nlohmann::json ToJson() const;
};

// Parses and checks an index; errors name the file and the field.
absl::StatusOr<ShardIndex> ReadIndex(const std::string& path);
// Writes path + ".tmp" and renames it into place.
absl::Status WriteIndex(const std::string& path, const ShardIndex& index);

}  // namespace dmc::data
