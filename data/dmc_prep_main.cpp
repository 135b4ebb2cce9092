// dmc-prep: tokenize text / JSONL into HDF5 token shards and an index (see data/prep.h).
//
//   dmc-prep --input=data/corpus --output=runs/kjv_byte --tokenizer=byte
//            --shard_tokens=262144 --val_fraction=0.1
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "data/prep.h"

ABSL_FLAG(std::vector<std::string>, input, {},
          "input files or directories, comma-separated (also accepted as positional arguments); "
          ".txt = one document per file, .jsonl = one JSON object per line with a text field");
ABSL_FLAG(std::string, output, "", "output directory for train_NNNNNN.h5, train_index.json, val_*");
ABSL_FLAG(std::string, tokenizer, "byte", "\"byte\" or the path of a SentencePiece .model");
ABSL_FLAG(int64_t, shard_tokens, int64_t{1} << 27, "tokens per shard (the last shard is shorter)");
ABSL_FLAG(double, val_fraction, 0.0, "fraction of documents held out into the validation split");
ABSL_FLAG(int, threads, 0, "tokenizer threads (0 = all cores)");
ABSL_FLAG(bool, add_bos, false, "put BOS before each document (EOS always follows each document)");
ABSL_FLAG(std::string, text_field, "text", "JSONL field that holds the document text");
ABSL_FLAG(bool, progress, true, "progress line (MB/s, tokens/s) on stderr");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Tokenizes text (.txt) or JSONL (.jsonl) files into HDF5 token shards.\n"
      "  dmc-prep --input=DIR_OR_FILES --output=DIR [--tokenizer=byte|path.model] "
      "[--shard_tokens=N] [--val_fraction=F] [--threads=N]");
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) { return absl::StrContains(file, "dmc_prep_main"); };
  absl::SetFlagsUsageConfig(usage);
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  dmc::data::PrepOptions o;
  o.inputs = absl::GetFlag(FLAGS_input);
  for (size_t i = 1; i < rest.size(); ++i) o.inputs.push_back(rest[i]);
  o.output_dir = absl::GetFlag(FLAGS_output);
  o.tokenizer = absl::GetFlag(FLAGS_tokenizer);
  o.shard_tokens = absl::GetFlag(FLAGS_shard_tokens);
  o.val_fraction = absl::GetFlag(FLAGS_val_fraction);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.add_bos = absl::GetFlag(FLAGS_add_bos);
  o.text_field = absl::GetFlag(FLAGS_text_field);
  o.progress = absl::GetFlag(FLAGS_progress);
  auto r = dmc::data::RunPrep(o);
  if (!r.ok()) {
    std::fprintf(stderr, "dmc-prep: error: %s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  return 0;
}
