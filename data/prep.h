// dmc-prep as a library: text / JSONL -> tokenized HDF5 shards + index (see shard.h, index.h).
//
// Inputs: files or directories (searched recursively, files in sorted path order; only *.txt and
// *.jsonl are taken from a directory, others are counted and named in the summary).
//   *.txt    one document per file
//   *.jsonl  one document per line: a JSON object with a string field `text` (--text_field);
//            blank lines are skipped; any other malformed line is an error naming file:line
// Each document is tokenized (without specials), optionally preceded by BOS, and followed by EOS.
// Empty documents are skipped (and counted). Shards are cut at exactly shard_tokens tokens, so a
// document may continue into the next shard (doc_offsets/continues_document record it).
//
// Validation split: document i (0-based, in input order, empty ones not counted) goes to
// validation when floor((i+1)*f) > floor(i*f), f = val_fraction: exactly floor(n*f) documents,
// spread evenly over the inputs, deterministic. A val_fraction > 0 that selects no document is an
// error (too few documents).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmc::data {

struct PrepOptions {
  std::vector<std::string> inputs;
  std::string output_dir;
  std::string tokenizer = "byte";           // "byte" or a SentencePiece .model path
  int64_t shard_tokens = int64_t{1} << 27;  // tokens per shard (the last one of a split shorter)
  double val_fraction = 0.0;                // share of documents held out for validation
  int threads = 0;                          // tokenizer threads; 0 = all cores
  bool add_bos = false;                     // also put BOS before each document
  std::string text_field = "text";          // JSONL field holding the document
  bool progress = true;                     // progress line on stderr
  // HDF5 chunk length of /tokens (<= shard_tokens): a read moves and checksums whole chunks, so
  // they are kept small next to a shard (64 KiB).
  int64_t chunk_tokens = int64_t{1} << 14;
};

struct PrepResult {
  std::string train_index;  // DIR/train_index.json
  std::string val_index;    // DIR/val_index.json, empty without a validation split
  int64_t files = 0;
  int64_t ignored_files = 0;  // files in input directories that are not .txt / .jsonl
  int64_t bytes = 0;          // text bytes read
  int64_t documents = 0;      // non-empty documents
  int64_t empty_documents = 0;
  int64_t train_documents = 0, val_documents = 0;
  int64_t train_tokens = 0, val_tokens = 0;
  int64_t train_shards = 0, val_shards = 0;
  double seconds = 0;
};

absl::StatusOr<PrepResult> RunPrep(const PrepOptions& options);

}  // namespace dmc::data
