// Safetensors weight files, read and written by our own small implementation.
//
// File layout (https://github.com/huggingface/safetensors):
//   [8 bytes]  N, the header length, unsigned little-endian
//   [N bytes]  JSON header: {"__metadata__": {str: str}, NAME: {"dtype": "BF16", "shape": [..],
//              "data_offsets": [begin, end]}, ...}, padded with spaces (we pad to a multiple of 8,
//              as the reference writer does, so the data region starts 8-byte aligned)
//   [rest]     the data region: each tensor's raw little-endian, row-major bytes at
//              [begin, end) relative to the start of the region
//
// Reading memory-maps the file and validates the header as strictly as the reference library:
// every tensor's byte span equals product(shape) x dtype size, the spans tile the data region
// exactly (no overlap, no gap, nothing past the end), so a truncated or corrupt file is refused at
// Open() with a message naming the file, the tensor and the problem.
//
// A Hugging Face checkpoint directory holds either one model.safetensors or several
// model-0000K-of-0000N.safetensors shards with model.safetensors.index.json mapping each tensor
// name to its shard; SafetensorsCheckpoint reads either, WriteShardedSafetensors writes either.
//
// Every file is written to PATH.tmp, fsynced and renamed over PATH, so a crash never leaves a
// half-written file under the final name.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmc::model {

// Every dtype the safetensors format defines. Only F32, F16 and BF16 can be read as float or
// written; files holding other dtypes still open (a real checkpoint may carry an odd integer
// buffer we never touch), and reading such a tensor gives a clear "not supported" error.
enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU64, kU32, kU16, kU8, kBool,
                   kF8E4M3, kF8E5M2 };

const char* DTypeName(DType dtype);   // the header spelling: "F32", "BF16", ...
int64_t DTypeSize(DType dtype);       // bytes per element
bool DTypeIsSupported(DType dtype);   // F32, F16, BF16

// Exact widening conversions and round-to-nearest-even narrowing ones. NaN stays NaN (sign and
// the top payload bits kept, quiet bit set); values beyond the largest finite number round to inf.
float Bf16ToFloat(uint16_t bits);
float Fp16ToFloat(uint16_t bits);
uint16_t FloatToBf16(float value);
uint16_t FloatToFp16(float value);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t data_begin = 0;  // byte span within the data region
  uint64_t data_end = 0;

  int64_t numel() const;
  uint64_t nbytes() const { return data_end - data_begin; }
};

// "[64, 32]", as the error messages print shapes.
std::string ShapeString(const std::vector<int64_t>& shape);

// One memory-mapped, validated .safetensors file. Not copyable; the mapping lives as long as the
// object.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  absl::StatusOr<TensorInfo> info(const std::string& name) const;  // NotFound if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Converts the tensor to fp32 into out (numel floats). The stored shape must equal
  // expected_shape exactly, so a checkpoint that does not match the config is caught here.
  absl::Status ReadAsFloat(const std::string& name, const std::vector<int64_t>& expected_shape,
                           float* out) const;

 private:
  SafetensorsFile() = default;

  std::string path_;
  const uint8_t* map_ = nullptr;  // the whole file
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data region inside map_
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A Hugging Face checkpoint directory: model.safetensors if present (as transformers prefers it),
// else model.safetensors.index.json and its shards. Open() opens and validates every shard and
// checks that each tensor of the weight_map is in the shard the map names.
class SafetensorsCheckpoint {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  absl::StatusOr<TensorInfo> info(const std::string& name) const;  // NotFound if absent
  absl::Status ReadAsFloat(const std::string& name, const std::vector<int64_t>& expected_shape,
                           float* out) const;
  int num_files() const { return static_cast<int>(files_.size()); }

 private:
  SafetensorsCheckpoint() = default;
  absl::Status NotFound(const std::string& name) const;

  std::string dir_;
  std::string index_path_;  // empty for a single model.safetensors
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;  // tensor name -> file holding it
};

struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;  // product(shape) floats, row-major
};

// Writes one .safetensors file with the tensors in the given order, converted to dtype (F32, F16
// or BF16). The metadata always carries "format": "pt" (transformers refuses safetensors files
// without it) unless the caller sets "format" itself.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              DType dtype, const std::map<std::string, std::string>& metadata = {});

// Writes a Hugging Face checkpoint's weights into dir (created if needed), as save_pretrained
// does: a single model.safetensors when all tensor bytes fit in max_shard_bytes, else shards
// model-00001-of-0000N.safetensors filled greedily in order (a tensor larger than the limit gets a
// shard of its own) plus model.safetensors.index.json {"metadata": {"total_size": bytes},
// "weight_map": {name: shard}}. Weight files of an earlier save in dir that this one does not
// produce are removed, so a stale model.safetensors can never shadow a new sharded index. Each
// file is atomic; for an atomic directory, write into a fresh one and rename it.
absl::Status WriteShardedSafetensors(const std::string& dir,
                                     const std::vector<TensorToWrite>& tensors, DType dtype,
                                     int64_t max_shard_bytes);

// Small file helpers, shared with config.json and the index. Errors name the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes contents to path.tmp, fsyncs, renames over path and fsyncs the directory.
absl::Status WriteFileAtomically(const std::string& path, std::string_view contents);

}  // namespace dmc::model
