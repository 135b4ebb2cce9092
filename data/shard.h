// Token shards: one HDF5 file per shard.
//
//   /tokens       uint32, 1-D, chunked (unlimited max size), the concatenated token stream, each
//                 chunk with HDF5's Fletcher-32 checksum (filter H5Z_FILTER_FLETCHER32)
//   /doc_offsets  uint64, 1-D, start offset of every document segment in the shard, then the
//                 number of tokens (so segment i is [doc_offsets[i], doc_offsets[i+1]))
//   attributes on the root group:
//     format "dmc-shard", format_version 2, tokenizer (string), vocab_size, bos_id, eos_id (int64),
//     num_tokens (int64), continues_document (int64 0/1: segment 0 continues a document of the
//     previous shard, because dmc-prep cuts shards at exactly --shard_tokens tokens)
//
// The reader reads [offset, offset+count) by hyperslab with the chunk cache off: a read moves the
// chunks it touches, whose checksums HDF5 verifies, and no shard is ever held in memory whole. A
// chunk whose bytes changed on disk fails its checksum: DataLoss naming the file and the chunk,
// whether or not the damaged tokens still lie inside the vocabulary.
//
// Version 1 (before the checksum) is refused with a message that says to re-make the shards with
// dmc-prep: data that cannot be checked is not trained on silently.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "data/hdf5_util.h"

namespace dmc::data {

struct ShardMeta {
  std::string tokenizer;
  int64_t vocab_size = 0;
  int64_t bos_id = -1;
  int64_t eos_id = -1;
  int64_t num_tokens = 0;    // length of /tokens
  int64_t num_segments = 0;  // document segments (length of /doc_offsets minus one)
  bool continues_document = false;
};

class ShardWriter {
 public:
  // Creates `path` (written as path + ".tmp", renamed by Close()). Token ids are checked against
  // meta.vocab_size on Append. chunk_tokens: HDF5 chunk length of /tokens.
  static absl::StatusOr<std::unique_ptr<ShardWriter>> Create(const std::string& path, const ShardMeta& meta,
                                                             int64_t chunk_tokens = 1 << 16);
  ~ShardWriter();

  // Appends tokens; starts_segment records a new document segment (a document, or the
  // continuation of one from the previous shard) at the current offset.
  absl::Status Append(const int32_t* tokens, int64_t n, bool starts_segment);
  // Marks segment 0 as the continuation of a document from the previous shard.
  void set_continues_document(bool v) { meta_.continues_document = v; }
  int64_t num_tokens() const { return meta_.num_tokens; }
  int64_t num_segments() const { return static_cast<int64_t>(doc_offsets_.size()); }
  // Flushes, writes doc_offsets and attributes, closes and renames into place.
  absl::Status Close();

 private:
  ShardWriter() = default;
  absl::Status Flush();

  std::string path_, tmp_path_;
  ShardMeta meta_;
  int64_t written_ = 0;  // tokens already in the dataset
  std::vector<uint32_t> buffer_;
  int64_t chunk_tokens_ = 0;
  std::vector<uint64_t> doc_offsets_;
  h5::Handle file_, tokens_;
  bool closed_ = false;
};

class ShardReader {
 public:
  // Opens and validates the layout (datasets, types, attributes, doc_offsets consistency).
  // Every error names the file.
  static absl::StatusOr<std::unique_ptr<ShardReader>> Open(const std::string& path);
  ~ShardReader();

  const ShardMeta& meta() const { return meta_; }
  const std::string& path() const { return path_; }
  // Reads tokens [offset, offset + count) into out (hyperslab read). A chunk that fails its
  // checksum: DataLoss naming the file and that chunk.
  absl::Status Read(int64_t offset, int64_t count, uint32_t* out);
  absl::StatusOr<std::vector<uint64_t>> ReadDocOffsets();

 private:
  ShardReader() = default;
  // Reads [offset, offset + count) without naming a damaged chunk.
  absl::Status ReadTokens(int64_t offset, int64_t count, uint32_t* out);
  // After a failed read of [offset, offset + count): the first chunk of it that fails alone.
  absl::Status NameDamagedChunk(int64_t offset, int64_t count);
  std::string path_;
  ShardMeta meta_;
  int64_t chunk_tokens_ = 0;
  h5::Handle file_, tokens_, filespace_;
};

}  // namespace dmc::data
