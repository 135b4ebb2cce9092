#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <regex>
#include <set>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

// The format stores little-endian bytes and we copy them straight into host integers and floats.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace dmc::model {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
// The reference implementation refuses headers above 100 MB; a real header is a few hundred KB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeEntry {
  DType dtype;
  const char* name;
  int64_t size;
};
constexpr DTypeEntry kDTypes[] = {
    {DType::kF32, "F32", 4},   {DType::kF16, "F16", 2},         {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},   {DType::kI64, "I64", 8},         {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},           {DType::kU64, "U64", 8},
    {DType::kU32, "U32", 4},   {DType::kU16, "U16", 2},         {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1}, {DType::kF8E4M3, "F8_E4M3", 1},  {DType::kF8E5M2, "F8_E5M2", 1},
};

const DTypeEntry& Entry(DType dtype) {
  for (const auto& e : kDTypes)
    if (e.dtype == dtype) return e;
  return kDTypes[0];  // unreachable: every enumerator is in the table
}

bool ParseDType(const std::string& name, DType* dtype) {
  for (const auto& e : kDTypes)
    if (name == e.name) {
      *dtype = e.dtype;
      return true;
    }
  return false;
}

std::string KnownDTypes() {
  std::vector<std::string> names;
  for (const auto& e : kDTypes) names.push_back(e.name);
  return absl::StrJoin(names, ", ");
}

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::string ErrnoText() { return std::strerror(errno); }

// product(shape) and its byte size, refusing negative dims and anything that overflows int64.
bool CountBytes(const std::vector<int64_t>& shape, int64_t elem_size, int64_t* numel,
                int64_t* nbytes) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
  }
  *numel = n;
  return !__builtin_mul_overflow(n, elem_size, nbytes);
}

// Output file written under path.tmp and renamed over path by Commit(); dropped (and the temp file
// removed) if Commit() is never reached, so errors leave whatever was at path untouched.
class AtomicFile {
 public:
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !tmp_.empty()) ::unlink(tmp_.c_str());
  }

  absl::Status Open(const std::string& path) {
    path_ = path;
    tmp_ = path + ".tmp";
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) return absl::UnavailableError(absl::StrCat(tmp_, ": cannot create: ", ErrnoText()));
    return absl::OkStatus();
  }

  absl::Status Write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return absl::UnavailableError(absl::StrCat(tmp_, ": write failed: ", ErrnoText()));
      p += w;
      n -= static_cast<size_t>(w);
    }
    return absl::OkStatus();
  }

  // fsync before rename so the new name never points at data still in flight; fsync the directory
  // after so the rename itself survives a crash.
  absl::Status Commit() {
    if (::fsync(fd_) != 0) return absl::UnavailableError(absl::StrCat(tmp_, ": fsync failed: ", ErrnoText()));
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) return absl::UnavailableError(absl::StrCat(tmp_, ": close failed: ", ErrnoText()));
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      return absl::UnavailableError(absl::StrCat("cannot rename ", tmp_, " to ", path_, ": ", ErrnoText()));
    committed_ = true;
    std::string dir = fs::path(path_).parent_path().string();
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return absl::UnavailableError(absl::StrCat(dir, ": cannot open directory: ", ErrnoText()));
    const int drc = ::fsync(dfd);
    ::close(dfd);
    if (drc != 0) return absl::UnavailableError(absl::StrCat(dir, ": fsync failed: ", ErrnoText()));
    return absl::OkStatus();
  }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

absl::Status CheckWritableDType(DType dtype) {
  if (DTypeIsSupported(dtype)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("cannot write dtype ", DTypeName(dtype),
                                                 " (supported: F32, F16, BF16)"));
}

// Converts n floats to dtype into dst (n * DTypeSize(dtype) bytes).
void EncodeFloats(const float* src, int64_t n, DType dtype, uint8_t* dst) {
  if (dtype == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = dtype == DType::kBF16 ? FloatToBf16(src[i]) : FloatToFp16(src[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// dtypes and conversions

const char* DTypeName(DType dtype) { return Entry(dtype).name; }
int64_t DTypeSize(DType dtype) { return Entry(dtype).size; }
bool DTypeIsSupported(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

// bf16 is the top half of an fp32, so widening is a shift.
float Bf16ToFloat(uint16_t bits) { return BitsFloat(static_cast<uint32_t>(bits) << 16); }

uint16_t FloatToBf16(float value) {
  const uint32_t u = FloatBits(value);
  // NaN: truncating could clear every payload bit left and turn it into inf, so set the quiet bit.
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  // Round to nearest, ties to even: add just under half an ulp, plus one if the kept part is odd.
  // A carry out of the mantissa bumps the exponent, which is exactly right, up to inf past the
  // largest finite bf16.
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

float Fp16ToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exp = (bits >> 10) & 0x1Fu;
  const uint32_t man = bits & 0x3FFu;
  if (exp == 0x1F) return BitsFloat(sign | 0x7F800000u | (man << 13));  // inf, NaN (payload kept)
  if (exp == 0) {
    // Zero or subnormal: man * 2^-24, exactly representable as a normal fp32.
    const float f = static_cast<float>(man) * 0x1p-24f;
    return sign ? -f : f;
  }
  return BitsFloat(sign | ((exp + 127 - 15) << 23) | (man << 13));  // rebias the exponent
}

uint16_t FloatToFp16(float value) {
  const uint32_t u = FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;  // |value|
  if (a > 0x7F800000u)  // NaN: keep the top payload bits, force the quiet bit so it stays NaN
    return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  // 65520 = 0x477FF000 is halfway between the largest finite half (65504) and 2^16; ties go to
  // the even neighbour, which is 2^16, i.e. inf.
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (a < 0x38800000u) {
    // Below 2^-14: a subnormal half, a multiple of 2^-24. 2^-25 (0x33000000) is the tie between
    // 0 and the smallest subnormal and goes to 0 (even).
    if (a <= 0x33000000u) return sign;
    const uint32_t exp = a >> 23;                      // 102..112
    const uint32_t man = (a & 0x7FFFFFu) | 0x800000u;  // with the implicit bit
    const uint32_t shift = 126 - exp;                  // value / 2^-24 = man >> shift
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;  // may reach 0x400, the smallest normal
    return static_cast<uint16_t>(sign | q);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even; a carry
  // into the exponent is correct and cannot reach inf because of the check above.
  uint32_t h = (a - ((127u - 15u) << 23)) >> 13;
  const uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// ---------------------------------------------------------------------------------------------
// Files

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const std::string msg = absl::StrCat(path, ": cannot open: ", ErrnoText());
    return errno == ENOENT ? absl::NotFoundError(msg) : absl::UnavailableError(msg);
  }
  std::string text;
  char buf[1 << 16];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const std::string msg = absl::StrCat(path, ": read failed: ", ErrnoText());
      ::close(fd);
      return absl::UnavailableError(msg);
    }
    if (r == 0) break;
    text.append(buf, static_cast<size_t>(r));
  }
  ::close(fd);
  return text;
}

absl::Status WriteFileAtomically(const std::string& path, std::string_view contents) {
  AtomicFile file;
  if (auto s = file.Open(path); !s.ok()) return s;
  if (auto s = file.Write(contents.data(), contents.size()); !s.ok()) return s;
  return file.Commit();
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto bad = [&path](const std::string& what) {
    return absl::DataLossError(absl::StrCat(path, ": ", what));
  };
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const std::string msg = absl::StrCat(path, ": cannot open: ", ErrnoText());
    return errno == ENOENT ? absl::NotFoundError(msg) : absl::UnavailableError(msg);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string msg = absl::StrCat(path, ": cannot stat: ", ErrnoText());
    ::close(fd);
    return absl::UnavailableError(msg);
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return bad(absl::StrFormat(
        "file is %d bytes, too short for the 8-byte header length (truncated?)", file_size));
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED)
    return absl::UnavailableError(absl::StrCat(path, ": mmap failed: ", std::strerror(map_errno)));
  file->map_ = static_cast<const uint8_t*>(map);
  file->map_size_ = file_size;

  uint64_t header_len;
  std::memcpy(&header_len, file->map_, 8);
  if (header_len > file_size - 8)
    return bad(absl::StrFormat("header length %d is larger than the %d bytes after it (truncated?)",
                               header_len, file_size - 8));
  if (header_len > kMaxHeaderBytes)
    return bad(absl::StrFormat("header length %d exceeds the %d-byte limit", header_len,
                               kMaxHeaderBytes));
  file->data_ = file->map_ + 8 + header_len;
  const uint64_t data_size = file_size - 8 - header_len;

  json header;
  try {
    header = json::parse(file->map_ + 8, file->map_ + 8 + header_len);
  } catch (const json::exception& e) {
    return bad(absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) return bad("header is not a JSON object");

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) return bad("__metadata__ is not a JSON object");
      for (const auto& [mkey, mvalue] : value.items()) {
        if (!mvalue.is_string())
          return bad(absl::StrCat("__metadata__ value of '", mkey, "' is not a string"));
        file->metadata_[mkey] = mvalue.get<std::string>();
      }
      continue;
    }
    auto bad_tensor = [&](const std::string& what) { return bad(absl::StrCat("tensor ", key, " ", what)); };
    if (!value.is_object()) return bad_tensor("entry is not a JSON object");
    TensorInfo t;
    t.name = key;

    const auto dtype_it = value.find("dtype");
    if (dtype_it == value.end() || !dtype_it->is_string()) return bad_tensor("has no dtype string");
    const std::string dtype_name = dtype_it->get<std::string>();
    if (!ParseDType(dtype_name, &t.dtype))
      return bad_tensor(absl::StrCat("has unknown dtype '", dtype_name, "' (known: ", KnownDTypes(),
                                     "; readable: F32, F16, BF16)"));

    const auto shape_it = value.find("shape");
    if (shape_it == value.end() || !shape_it->is_array()) return bad_tensor("has no shape array");
    for (const auto& d : *shape_it) {
      if (!d.is_number_unsigned()) return bad_tensor(absl::StrCat("has a bad shape ", shape_it->dump()));
      t.shape.push_back(static_cast<int64_t>(std::min<uint64_t>(d.get<uint64_t>(), INT64_MAX)));
    }

    const auto off_it = value.find("data_offsets");
    if (off_it == value.end() || !off_it->is_array() || off_it->size() != 2 ||
        !(*off_it)[0].is_number_unsigned() || !(*off_it)[1].is_number_unsigned())
      return bad_tensor("has no data_offsets [begin, end] of non-negative integers");
    t.data_begin = (*off_it)[0].get<uint64_t>();
    t.data_end = (*off_it)[1].get<uint64_t>();
    if (t.data_begin > t.data_end)
      return bad_tensor(absl::StrFormat("has data_offsets [%d, %d] with begin after end",
                                        t.data_begin, t.data_end));
    if (t.data_end > data_size)
      return bad_tensor(absl::StrFormat(
          "has data_offsets [%d, %d] past the end of the %d-byte data region (truncated?)",
          t.data_begin, t.data_end, data_size));

    int64_t numel, nbytes;
    if (!CountBytes(t.shape, DTypeSize(t.dtype), &numel, &nbytes))
      return bad_tensor(absl::StrCat("has a shape ", ShapeString(t.shape), " too large to address"));
    if (static_cast<uint64_t>(nbytes) != t.nbytes())
      return bad_tensor(absl::StrFormat(
          "has shape %s of %s, which needs %d bytes, but data_offsets [%d, %d] span %d bytes",
          ShapeString(t.shape), dtype_name, nbytes, t.data_begin, t.data_end, t.nbytes()));
    file->tensors_.emplace(key, std::move(t));
  }

  // The spans must tile the data region: in offset order each tensor starts where the previous
  // one ended and the last ends at the end of the file. This refuses overlaps (two tensors
  // aliasing bytes), holes and trailing bytes, as the reference implementation does.
  std::vector<const TensorInfo*> order;
  for (const auto& [name, t] : file->tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::tie(a->data_begin, a->data_end, a->name) < std::tie(b->data_begin, b->data_end, b->name);
  });
  uint64_t covered = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : order) {
    if (t->data_begin < covered)
      return bad(absl::StrFormat("tensor %s (bytes [%d, %d)) overlaps tensor %s (bytes [%d, %d))",
                                 t->name, t->data_begin, t->data_end, prev->name, prev->data_begin,
                                 prev->data_end));
    if (t->data_begin > covered)
      return bad(absl::StrFormat("bytes [%d, %d) of the data region before tensor %s belong to no tensor",
                                 covered, t->data_begin, t->name));
    covered = t->data_end;
    prev = t;
  }
  if (covered != data_size)
    return bad(absl::StrFormat("the data region has %d bytes but the tensors cover only %d",
                               data_size, covered));
  return file;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : tensors_) out.push_back(name);
  return out;
}

absl::StatusOr<TensorInfo> SafetensorsFile::info(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat(path_, ": no tensor named ", name));
  return it->second;
}

absl::Status SafetensorsFile::ReadAsFloat(const std::string& name,
                                          const std::vector<int64_t>& expected_shape,
                                          float* out) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat(path_, ": no tensor named ", name));
  const TensorInfo& t = it->second;
  if (t.shape != expected_shape)
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", name, " has shape ",
                                                   ShapeString(t.shape), ", config expects ",
                                                   ShapeString(expected_shape)));
  if (!DTypeIsSupported(t.dtype))
    return absl::UnimplementedError(absl::StrCat(path_, ": tensor ", name, " has dtype ",
                                                 DTypeName(t.dtype),
                                                 ", which cannot be read as float (supported: F32, F16, BF16)"));
  // Element-wise memcpy: the data region need not be aligned if another writer left the header
  // length unpadded.
  const uint8_t* src = data_ + t.data_begin;
  const int64_t n = t.numel();
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * 4);
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = Bf16ToFloat(h);
      }
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = Fp16ToFloat(h);
      }
      break;
    default:
      break;  // refused above
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// SafetensorsCheckpoint

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir) {
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint());
  ckpt->dir_ = dir;
  const std::string single = (fs::path(dir) / kSingleFile).string();
  const std::string index = (fs::path(dir) / kIndexFile).string();
  std::error_code ec;

  if (fs::exists(single, ec)) {
    auto file = SafetensorsFile::Open(single);
    if (!file.ok()) return file.status();
    for (const auto& name : (*file)->names()) ckpt->where_[name] = file->get();
    ckpt->files_.push_back(std::move(*file));
    return ckpt;
  }
  if (!fs::exists(index, ec)) {
    if (!fs::is_directory(dir, ec))
      return absl::NotFoundError(absl::StrCat(dir, ": not a checkpoint directory"));
    return absl::NotFoundError(
        absl::StrCat(dir, ": has neither ", kSingleFile, " nor ", kIndexFile));
  }

  ckpt->index_path_ = index;
  auto bad = [&index](const std::string& what) {
    return absl::DataLossError(absl::StrCat(index, ": ", what));
  };
  auto text = ReadFileToString(index);
  if (!text.ok()) return text.status();
  json j;
  try {
    j = json::parse(*text);
  } catch (const json::exception& e) {
    return bad(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    return bad("has no weight_map object");

  // Open each shard once, in name order, then check every mapped tensor is really in its shard.
  std::map<std::string, std::vector<std::string>> shard_tensors;  // shard file -> its tensors
  for (const auto& [name, shard] : j["weight_map"].items()) {
    if (!shard.is_string()) return bad(absl::StrCat("weight_map entry of ", name, " is not a string"));
    const std::string shard_name = shard.get<std::string>();
    const fs::path p(shard_name);
    // Shards live next to the index; refusing other paths keeps a crafted index inside dir.
    if (shard_name.empty() || p.is_absolute() || p.lexically_normal().string().rfind("..", 0) == 0)
      return bad(absl::StrCat("weight_map puts ", name, " in '", shard_name,
                              "', which is not a file inside the checkpoint directory"));
    shard_tensors[shard_name].push_back(name);
  }
  for (const auto& [shard_name, tensors] : shard_tensors) {
    auto file = SafetensorsFile::Open((fs::path(dir) / shard_name).string());
    if (!file.ok())
      return absl::Status(file.status().code(),
                          absl::StrCat(index, ": shard ", shard_name, " (holding ", tensors.front(),
                                       ") cannot be loaded: ", file.status().message()));
    for (const auto& name : tensors) {
      if (!(*file)->contains(name))
        return bad(absl::StrCat("weight_map puts tensor ", name, " in ", shard_name,
                                ", but that shard has no such tensor"));
      ckpt->where_[name] = file->get();
    }
    ckpt->files_.push_back(std::move(*file));
  }
  return ckpt;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

absl::Status SafetensorsCheckpoint::NotFound(const std::string& name) const {
  const std::string where = index_path_.empty()
                                ? (fs::path(dir_) / kSingleFile).string()
                                : absl::StrCat("the weight_map of ", index_path_);
  return absl::NotFoundError(absl::StrCat("checkpoint ", dir_, ": tensor ", name,
                                          " is missing (not in ", where, ")"));
}

absl::StatusOr<TensorInfo> SafetensorsCheckpoint::info(const std::string& name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) return NotFound(name);
  return it->second->info(name);
}

absl::Status SafetensorsCheckpoint::ReadAsFloat(const std::string& name,
                                                const std::vector<int64_t>& expected_shape,
                                                float* out) const {
  const auto it = where_.find(name);
  if (it == where_.end()) return NotFound(name);
  return it->second->ReadAsFloat(name, expected_shape, out);
}

// ---------------------------------------------------------------------------------------------
// Writers

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              DType dtype, const std::map<std::string, std::string>& metadata) {
  auto bad = [&path](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
  };
  if (auto s = CheckWritableDType(dtype); !s.ok()) return bad(std::string(s.message()));
  const int64_t elem = DTypeSize(dtype);

  // Header: tensors laid out back to back in the given order. One dtype for all keeps every
  // offset a multiple of the element size.
  json header = json::object();
  json meta = json::object();
  meta["format"] = "pt";
  for (const auto& [k, v] : metadata) meta[k] = v;
  header["__metadata__"] = meta;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      return bad(absl::StrCat("invalid tensor name '", t.name, "'"));
    if (!seen.insert(t.name).second) return bad(absl::StrCat("tensor ", t.name, " given twice"));
    int64_t numel, nbytes;
    if (!CountBytes(t.shape, elem, &numel, &nbytes))
      return bad(absl::StrCat("tensor ", t.name, " has an invalid shape ", ShapeString(t.shape)));
    if (numel > 0 && t.data == nullptr) return bad(absl::StrCat("tensor ", t.name, " has no data"));
    json entry = json::object();
    entry["dtype"] = DTypeName(dtype);
    entry["shape"] = t.shape;
    entry["data_offsets"] = json::array({offset, offset + static_cast<uint64_t>(nbytes)});
    header[t.name] = entry;
    offset += static_cast<uint64_t>(nbytes);
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {  // e.g. a name that is not valid UTF-8
    return bad(absl::StrCat("cannot encode the header: ", e.what()));
  }
  // Pad with spaces (valid JSON whitespace) so the data region starts 8-byte aligned, as the
  // reference writer does; readers may then use the buffers in place.
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_len = text.size();

  AtomicFile file;
  if (auto s = file.Open(path); !s.ok()) return s;
  if (auto s = file.Write(&header_len, 8); !s.ok()) return s;
  if (auto s = file.Write(text.data(), text.size()); !s.ok()) return s;
  // Convert in chunks so a multi-GB tensor never needs a second full-size buffer.
  constexpr int64_t kChunk = 1 << 20;
  std::vector<uint8_t> buf(static_cast<size_t>(kChunk * elem));
  for (const auto& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    for (int64_t i = 0; i < numel; i += kChunk) {
      const int64_t n = std::min(kChunk, numel - i);
      EncodeFloats(t.data + i, n, dtype, buf.data());
      if (auto s = file.Write(buf.data(), static_cast<size_t>(n * elem)); !s.ok()) return s;
    }
  }
  return file.Commit();
}

absl::Status WriteShardedSafetensors(const std::string& dir,
                                     const std::vector<TensorToWrite>& tensors, DType dtype,
                                     int64_t max_shard_bytes) {
  if (auto s = CheckWritableDType(dtype); !s.ok())
    return absl::InvalidArgumentError(absl::StrCat(dir, ": ", s.message()));
  if (max_shard_bytes <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": max_shard_bytes must be > 0, got ", max_shard_bytes));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::UnavailableError(absl::StrCat(dir, ": cannot create directory: ", ec.message()));

  // Greedy split in the given order, as transformers does: start a new shard when the next tensor
  // would push a non-empty shard past the limit. Sizes count tensor bytes only, not headers.
  std::vector<std::vector<TensorToWrite>> shards(1);
  int64_t shard_bytes = 0, total_bytes = 0;
  for (const auto& t : tensors) {
    int64_t numel, nbytes;
    if (!CountBytes(t.shape, DTypeSize(dtype), &numel, &nbytes))
      return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor ", t.name,
                                                     " has an invalid shape ", ShapeString(t.shape)));
    if (!shards.back().empty() && shard_bytes + nbytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(t);
    shard_bytes += nbytes;
    total_bytes += nbytes;
  }

  std::set<std::string> written;
  if (shards.size() == 1) {
    if (auto s = WriteSafetensors((fs::path(dir) / kSingleFile).string(), tensors, dtype); !s.ok())
      return s;
    written.insert(kSingleFile);
  } else {
    json weight_map = json::object();
    const int n = static_cast<int>(shards.size());
    for (int i = 0; i < n; ++i) {
      const std::string name = absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, n);
      if (auto s = WriteSafetensors((fs::path(dir) / name).string(), shards[i], dtype); !s.ok())
        return s;
      for (const auto& t : shards[i]) weight_map[t.name] = name;
      written.insert(name);
    }
    // The index goes last: once it names the new shards, they are all complete on disk.
    json index = json::object();
    index["metadata"] = {{"total_size", total_bytes}};
    index["weight_map"] = weight_map;
    if (auto s = WriteFileAtomically((fs::path(dir) / kIndexFile).string(), index.dump(2) + "\n");
        !s.ok())
      return s;
    written.insert(kIndexFile);
  }

  // Remove weight files of an earlier save that this one did not rewrite (HF does the same): a
  // leftover model.safetensors would shadow the new index, leftover shards would confuse readers.
  static const std::regex kWeightFile(
      R"(model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors)");
  std::vector<fs::path> stale;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, kWeightFile) && !written.count(name)) stale.push_back(entry.path());
  }
  if (ec) return absl::UnavailableError(absl::StrCat(dir, ": cannot list directory: ", ec.message()));
  for (const auto& p : stale) {
    fs::remove(p, ec);
    if (ec)
      return absl::UnavailableError(
          absl::StrCat(p.string(), ": cannot remove stale weight file: ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace dmc::model
