#include "data/index.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmc::data {
namespace {

constexpr char kIndexFormat[] = "dmc-shard-index";
constexpr int kIndexVersion = 1;

absl::Status Bad(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": malformed shard index: ", what));
}

absl::StatusOr<int64_t> GetInt(const nlohmann::json& j, const char* key, const std::string& path,
                               const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) return Bad(path, absl::StrCat(where, "missing field '", key, "'"));
  if (!it->is_number_integer()) return Bad(path, absl::StrCat(where, "field '", key, "' must be an integer"));
  return it->get<int64_t>();
}

absl::StatusOr<std::string> GetString(const nlohmann::json& j, const char* key, const std::string& path,
                                      const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) return Bad(path, absl::StrCat(where, "missing field '", key, "'"));
  if (!it->is_string()) return Bad(path, absl::StrCat(where, "field '", key, "' must be a string"));
  return it->get<std::string>();
}

}  // namespace

nlohmann::json ShardIndex::ToJson() const {
  nlohmann::json j;
  j["format"] = kIndexFormat;
  j["version"] = kIndexVersion;
  j["split"] = split;
  j["tokenizer"] = tokenizer;
  j["vocab_size"] = vocab_size;
  j["bos_id"] = bos_id;
  j["eos_id"] = eos_id;
  j["num_tokens"] = num_tokens;
  j["num_documents"] = num_documents;
  nlohmann::json arr = nlohmann::json::array();
  for (const auto& s : shards)
    arr.push_back({{"path", s.path}, {"num_tokens", s.num_tokens}, {"num_segments", s.num_segments}});
  j["shards"] = std::move(arr);
  return j;
}

absl::StatusOr<ShardIndex> ReadIndex(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    return absl::NotFoundError(absl::StrCat(path, ": shard index not found"));
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::UnavailableError(absl::StrCat(path, ": cannot read shard index"));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(path, "not valid JSON");
  if (!j.is_object()) return Bad(path, "top level must be an object");
  auto fmt = GetString(j, "format", path, "");
  if (!fmt.ok()) return fmt.status();
  if (*fmt != kIndexFormat)
    return Bad(path, absl::StrCat("format is '", *fmt, "', expected '", kIndexFormat, "'"));
  auto ver = GetInt(j, "version", path, "");
  if (!ver.ok()) return ver.status();
  if (*ver != kIndexVersion) return Bad(path, absl::StrCat("unsupported version ", *ver));

  ShardIndex idx;
  auto split = GetString(j, "split", path, "");
  auto tok = GetString(j, "tokenizer", path, "");
  if (!split.ok()) return split.status();
  if (!tok.ok()) return tok.status();
  idx.split = *split;
  idx.tokenizer = *tok;
  for (auto [key, dst] : {std::pair<const char*, int64_t*>{"vocab_size", &idx.vocab_size},
                          {"bos_id", &idx.bos_id},
                          {"eos_id", &idx.eos_id},
                          {"num_tokens", &idx.num_tokens},
                          {"num_documents", &idx.num_documents}}) {
    auto v = GetInt(j, key, path, "");
    if (!v.ok()) return v.status();
    *dst = *v;
  }
  if (idx.vocab_size <= 0) return Bad(path, absl::StrCat("vocab_size must be > 0, got ", idx.vocab_size));
  auto it = j.find("shards");
  if (it == j.end()) return Bad(path, "missing field 'shards'");
  if (!it->is_array()) return Bad(path, "field 'shards' must be an array");
  if (it->empty()) return Bad(path, "field 'shards' lists no shard");
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  int64_t total = 0;
  for (size_t i = 0; i < it->size(); ++i) {
    const nlohmann::json& s = (*it)[i];
    std::string where = absl::StrCat("shards[", i, "]: ");
    if (!s.is_object()) return Bad(path, absl::StrCat(where, "must be an object"));
    ShardEntry e;
    auto p = GetString(s, "path", path, where);
    auto n = GetInt(s, "num_tokens", path, where);
    auto d = GetInt(s, "num_segments", path, where);
    if (!p.ok()) return p.status();
    if (!n.ok()) return n.status();
    if (!d.ok()) return d.status();
    if (p->empty()) return Bad(path, absl::StrCat(where, "empty path"));
    if (*n < 0) return Bad(path, absl::StrCat(where, "negative num_tokens"));
    e.path = *p;
    std::filesystem::path sp(e.path);
    e.resolved_path = sp.is_absolute() ? sp.string() : (dir / sp).string();
    e.num_tokens = *n;
    e.num_segments = *d;
    total += e.num_tokens;
    idx.shards.push_back(std::move(e));
  }
  if (total != idx.num_tokens)
    return Bad(path, absl::StrFormat("num_tokens is %d but the shards add up to %d", idx.num_tokens, total));
  return idx;
}

absl::Status WriteIndex(const std::string& path, const ShardIndex& index) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::UnavailableError(absl::StrCat(tmp, ": cannot write shard index"));
    out << index.ToJson().dump(2) << "\n";
    if (!out) return absl::UnavailableError(absl::StrCat(tmp, ": write failed"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat(path, ": cannot rename from ", tmp, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace dmc::data
