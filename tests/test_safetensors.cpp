// Safetensors reader/writer: bit-exact round trips in every supported dtype, round-to-nearest-even
// narrowing checked on hand-picked values (ties, overflow, subnormals, NaN, inf), sharded
// checkpoints, and one test per kind of broken input, each checking that the error names the file.
#include "model/safetensors.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"

namespace dmc::model {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A fresh directory per test, removed afterwards.
class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "dmc_safetensors_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // A file with a hand-written header and data region, for the broken-input tests.
  std::string WriteRaw(const std::string& name, const std::string& header, size_t data_bytes) {
    const std::string path = Path(name);
    std::ofstream out(path, std::ios::binary);
    const uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header << std::string(data_bytes, '\0');
    return path;
  }

  // Reads back every tensor and compares bit patterns with want (already in the stored dtype).
  static void ExpectBits(const SafetensorsFile& file, const std::string& name,
                         const std::vector<int64_t>& shape, const std::vector<float>& want) {
    std::vector<float> got(want.size(), 123.0f);
    ASSERT_TRUE(file.ReadAsFloat(name, shape, got.data()).ok()) << name;
    for (size_t i = 0; i < want.size(); ++i)
      ASSERT_EQ(Bits(got[i]), Bits(want[i])) << name << "[" << i << "] = " << got[i];
  }

  std::string dir_;
};

// Every fp32 bit pattern survives, NaN payloads, -0, inf and subnormals included; scalars and
// empty tensors too.
TEST_F(SafetensorsTest, Fp32RoundTripIsBitExact) {
  std::mt19937 rng(1);
  std::vector<float> a(6 * 7);
  for (auto& x : a) x = FromBits(rng());
  const std::vector<float> specials = {0.0f, -0.0f, INFINITY, -INFINITY, FromBits(0x7FC01234),
                                       FromBits(0xFF800001), FromBits(1), FromBits(0x807FFFFF)};
  const std::vector<float> scalar = {3.25f};
  const std::string path = Path("f32.safetensors");
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"a", {6, 7}, a.data()},
                                {"specials", {8}, specials.data()},
                                {"scalar", {}, scalar.data()},
                                {"empty", {0, 3}, nullptr}},
                               DType::kF32, {{"step", "42"}})
                  .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->names(), (std::vector<std::string>{"a", "empty", "scalar", "specials"}));
  EXPECT_EQ((*file)->metadata().at("step"), "42");
  EXPECT_EQ((*file)->metadata().at("format"), "pt");  // transformers refuses files without it
  auto info = (*file)->info("a");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->dtype, DType::kF32);
  EXPECT_EQ(info->shape, (std::vector<int64_t>{6, 7}));
  EXPECT_EQ(info->nbytes(), 6u * 7u * 4u);
  ExpectBits(**file, "a", {6, 7}, a);
  ExpectBits(**file, "specials", {8}, specials);
  ExpectBits(**file, "scalar", {}, scalar);
  ExpectBits(**file, "empty", {0, 3}, {});
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

// The header is padded with spaces to a multiple of 8 (as the reference writer does), so the data
// region is 8-byte aligned.
TEST_F(SafetensorsTest, HeaderIsSpacePaddedToMultipleOf8) {
  const std::vector<float> x = {1, 2, 3};
  for (const std::string name : {"a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh"}) {
    const std::string path = Path(name + ".safetensors");
    ASSERT_TRUE(WriteSafetensors(path, {{name, {3}, x.data()}}, DType::kBF16).ok());
    const std::string bytes = ReadAll(path);
    uint64_t n;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ(n % 8, 0u) << name;
    EXPECT_EQ(bytes[8], '{');
    EXPECT_EQ(bytes.size(), 8 + n + 3 * 2);
    const std::string header = bytes.substr(8, n);
    EXPECT_NO_THROW(json::parse(header));
    EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));
  }
}

// Values exactly representable in bf16 come back bit for bit; the file stores their top halves.
TEST_F(SafetensorsTest, Bf16RoundTripIsBitExactForRepresentableValues) {
  std::vector<float> x;
  for (uint32_t h = 0; h < 0x10000; h += 7) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(h));
    if (!std::isnan(f)) x.push_back(f);
  }
  x.push_back(FromBits(0x7FC00000));  // the canonical NaN survives as such
  const std::string path = Path("bf16.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"x", {static_cast<int64_t>(x.size())}, x.data()}},
                               DType::kBF16).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->info("x")->dtype, DType::kBF16);
  ExpectBits(**file, "x", {static_cast<int64_t>(x.size())}, x);
}

// Hand-picked fp32 -> bf16 cases: ties go to the even neighbour, just above/below a tie go to the
// nearer one, the top of the range overflows to inf, NaN stays NaN (even one whose payload lives
// only in the dropped bits).
TEST_F(SafetensorsTest, Bf16RoundsToNearestEven) {
  struct Case {
    uint32_t in;
    uint16_t want;
  };
  const Case cases[] = {
      {0x3F800000, 0x3F80},  // 1.0 exact
      {0x3F808000, 0x3F80},  // 1 + 2^-8: tie, 0x3F80 is even -> down
      {0x3F818000, 0x3F82},  // tie, 0x3F81 is odd -> up
      {0x3F808001, 0x3F81},  // just above the tie -> up
      {0x3F807FFF, 0x3F80},  // just below the tie -> down
      {0xBF818000, 0xBF82},  // negative tie, odd -> away from zero
      {0x3FFF8000, 0x4000},  // tie at the top of a binade carries into the exponent (2.0)
      {0x7F7F7FFF, 0x7F7F},  // largest finite bf16 stays
      {0x7F7F8000, 0x7F80},  // tie above the largest finite bf16 (odd) -> inf
      {0x7F7FFFFF, 0x7F80},  // FLT_MAX -> inf
      {0x7F800000, 0x7F80},  // inf
      {0xFF800000, 0xFF80},  // -inf
      {0x80000000, 0x8000},  // -0
      {0x00008000, 0x0000},  // subnormal tie, even -> 0
      {0x00018000, 0x0002},  // subnormal tie, odd -> up
      {0x7FC00000, 0x7FC0},  // quiet NaN
      {0xFFC00000, 0xFFC0},  // negative NaN keeps its sign
      {0x7F800001, 0x7FC0},  // NaN with payload only in dropped bits: must not become inf
      {0x7FA50000, 0x7FE5},  // payload kept, quiet bit set
  };
  std::vector<float> in;
  for (const Case& c : cases) {
    in.push_back(FromBits(c.in));
    EXPECT_EQ(FloatToBf16(FromBits(c.in)), c.want) << std::hex << c.in;
  }
  // The same values through a file.
  const std::string path = Path("rne.safetensors");
  const int64_t n = static_cast<int64_t>(in.size());
  ASSERT_TRUE(WriteSafetensors(path, {{"x", {n}, in.data()}}, DType::kBF16).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<float> want;
  for (const Case& c : cases) want.push_back(Bf16ToFloat(c.want));
  ExpectBits(**file, "x", {n}, want);
}

// On random finite floats, the bf16 result is the nearer of the two neighbours (even on a tie).
TEST_F(SafetensorsTest, Bf16RoundingMatchesNearestNeighbour) {
  std::mt19937 rng(2);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = (i % 4 == 0) ? ((rng() & 0xFFFF0000u) | 0x8000u) : rng();  // many ties
    const float x = FromBits(u);
    if (!std::isfinite(x)) continue;
    const uint16_t lo = static_cast<uint16_t>(u >> 16);  // truncation, toward zero
    const double a = Bf16ToFloat(lo);
    // Above the largest finite bf16 the next step would be 2^128, where rounding up gives inf.
    const double b = (lo & 0x7FFF) == 0x7F7F ? std::copysign(std::ldexp(1.0, 128), a)
                                             : static_cast<double>(Bf16ToFloat(lo + 1));
    const double da = std::fabs(x - a), db = std::fabs(x - b);
    const uint16_t want = da < db ? lo : db < da ? lo + 1 : ((lo & 1) ? lo + 1 : lo);
    ASSERT_EQ(FloatToBf16(x), want) << std::hex << u;
  }
}

// Every fp16 value converts to fp32 and back unchanged, and fp16 files round-trip bit-exactly.
TEST_F(SafetensorsTest, Fp16RoundTripIsBitExact) {
  std::vector<float> x;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Fp16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(f)))) << h;
      continue;
    }
    ASSERT_EQ(FloatToFp16(f), h) << std::hex << h;
    x.push_back(f);
  }
  EXPECT_EQ(Fp16ToFloat(0x3C00), 1.0f);
  EXPECT_EQ(Fp16ToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(Fp16ToFloat(0x0001), std::ldexp(1.0f, -24));
  const std::string path = Path("f16.safetensors");
  const int64_t n = static_cast<int64_t>(x.size());
  ASSERT_TRUE(WriteSafetensors(path, {{"x", {n}, x.data()}}, DType::kF16).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->info("x")->dtype, DType::kF16);
  ExpectBits(**file, "x", {n}, x);
}

TEST_F(SafetensorsTest, Fp16RoundsToNearestEven) {
  struct Case {
    float in;
    uint16_t want;
  };
  const float u = std::ldexp(1.0f, -24);  // the smallest subnormal half
  const Case cases[] = {
      {1.0f + std::ldexp(1.0f, -11), 0x3C00},      // tie, even -> down
      {1.0f + 3 * std::ldexp(1.0f, -11), 0x3C02},  // tie, odd -> up
      {1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), 0x3C01},  // above the tie
      {65504.0f, 0x7BFF},                          // largest finite half
      {65519.0f, 0x7BFF},                          // below the overflow tie
      {65520.0f, 0x7C00},                          // overflow tie -> inf (even)
      {1e6f, 0x7C00},
      {-1e6f, 0xFC00},
      {INFINITY, 0x7C00},
      {-0.0f, 0x8000},
      {u, 0x0001},
      {u / 2, 0x0000},                             // tie between 0 and u -> 0
      {u * 1.5f, 0x0002},                          // tie between 1u and 2u -> 2u (even)
      {u * 2.5f, 0x0002},                          // tie between 2u and 3u -> 2u
      {u * 0.75f, 0x0001},
      {std::ldexp(1.0f, -14), 0x0400},             // smallest normal half
      {std::ldexp(1.0f, -14) - u / 2, 0x0400},     // tie between 0x3FF and 0x400 -> 0x400
      {std::ldexp(1.0f, -30), 0x0000},             // far below: zero
  };
  for (const Case& c : cases) EXPECT_EQ(FloatToFp16(c.in), c.want) << c.in;
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(NAN))));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(FromBits(0x7F800001)))));  // low payload only
  EXPECT_EQ(FloatToFp16(FromBits(0xFFC00000)) & 0x8000, 0x8000);            // sign kept
#ifdef __FLT16_MAX__
  // The compiler's own _Float16 conversion rounds to nearest even too: compare on random floats.
  std::mt19937 rng(3);
  for (int i = 0; i < 200000; ++i) {
    const float x = FromBits(rng());
    if (std::isnan(x)) continue;
    const _Float16 h = static_cast<_Float16>(x);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    ASSERT_EQ(FloatToFp16(x), want) << std::hex << Bits(x);
  }
#endif
}

// A file written by the reference implementation (safetensors 0.8.0 save_file from torch tensors,
// run on the device), hex-encoded: its layout (I64 first, dtype-size order, 6 spaces of padding)
// differs from ours, and every float tensor must read back exactly.
constexpr const char* kReferenceFileHex =
    "08010000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c22696473223a7b22"
    "6474797065223a22493634222c227368617065223a5b325d2c22646174615f6f666673657473223a5b302c31365d7d2c"
    "2263223a7b226474797065223a22463332222c227368617065223a5b322c325d2c22646174615f6f666673657473223a"
    "5b31362c33325d7d2c2261223a7b226474797065223a2242463136222c227368617065223a5b322c335d2c2264617461"
    "5f6f666673657473223a5b33322c34345d7d2c2262223a7b226474797065223a22463136222c227368617065223a5b34"
    "5d2c22646174615f6f666673657473223a5b34342c35325d7d7d2020202020200700000000000000ffffffffffffffff"
    "0000803f000080bfcdcccc3dcaf24971c03f10c0000000808044807f0038fffb01000042";

TEST_F(SafetensorsTest, ReadsFileWrittenByReferenceImplementation) {
  const std::string hex = kReferenceFileHex;
  std::string bytes;
  for (size_t i = 0; i < hex.size(); i += 2) bytes.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  const std::string path = Path("reference.safetensors");
  std::ofstream(path, std::ios::binary) << bytes;
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->names(), (std::vector<std::string>{"a", "b", "c", "ids"}));
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  ExpectBits(**file, "a", {2, 3}, {1.5f, -2.25f, 0.0f, -0.0f, 1024.0f, INFINITY});
  ExpectBits(**file, "b", {4}, {0.5f, -65504.0f, std::ldexp(1.0f, -24), 3.0f});
  ExpectBits(**file, "c", {2, 2}, {1.0f, -1.0f, 0.1f, 1e30f});
  EXPECT_EQ((*file)->info("ids")->dtype, DType::kI64);
  EXPECT_EQ((*file)->info("ids")->data_begin, 0u);
}

// A small max_shard_bytes forces several shards; the index lists every tensor and the byte total,
// and the checkpoint reads everything back.
TEST_F(SafetensorsTest, ShardedRoundTrip) {
  std::mt19937 rng(4);
  std::vector<std::vector<float>> data;
  std::vector<TensorToWrite> tensors;
  const std::vector<std::vector<int64_t>> shapes = {{8, 4}, {16}, {40, 2}, {3, 3}, {4, 4}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : shapes[i]) n *= d;
    std::vector<float> v(n);
    for (auto& x : v) x = Bf16ToFloat(static_cast<uint16_t>(rng() & 0x7F7F));  // finite bf16
    data.push_back(std::move(v));
  }
  for (size_t i = 0; i < shapes.size(); ++i)
    tensors.push_back({"layers." + std::to_string(i) + ".weight", shapes[i], data[i].data()});
  // bf16 sizes: 64, 32, 160, 18, 32 bytes. With a 100-byte limit: [64, 32], [160] (alone, over
  // the limit), [18, 32].
  ASSERT_TRUE(WriteShardedSafetensors(dir_, tensors, DType::kBF16, 100).ok());
  for (int k = 1; k <= 3; ++k)
    EXPECT_TRUE(fs::exists(Path("model-0000" + std::to_string(k) + "-of-00003.safetensors")));
  EXPECT_FALSE(fs::exists(Path("model.safetensors")));

  const json index = json::parse(ReadAll(Path("model.safetensors.index.json")));
  EXPECT_EQ(index["metadata"]["total_size"], 64 + 32 + 160 + 18 + 32);
  EXPECT_EQ(index["weight_map"].size(), 5u);
  EXPECT_EQ(index["weight_map"]["layers.0.weight"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.1.weight"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.2.weight"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.3.weight"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.4.weight"], "model-00003-of-00003.safetensors");

  auto ckpt = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->num_files(), 3);
  EXPECT_EQ((*ckpt)->names().size(), 5u);
  for (size_t i = 0; i < shapes.size(); ++i) {
    std::vector<float> got(data[i].size());
    ASSERT_TRUE((*ckpt)->ReadAsFloat(tensors[i].name, shapes[i], got.data()).ok());
    for (size_t j = 0; j < got.size(); ++j) ASSERT_EQ(Bits(got[j]), Bits(data[i][j]));
  }
  EXPECT_EQ((*ckpt)->info("layers.2.weight")->shape, (std::vector<int64_t>{40, 2}));
}

// When everything fits, one model.safetensors and no index, as save_pretrained does; re-saving a
// directory removes the other layout's files so they can never shadow the new ones.
TEST_F(SafetensorsTest, ShardedWriterUsesSingleFileWhenItFitsAndRemovesStaleFiles) {
  const std::vector<float> a(64, 0.5f), b(64, -2.0f);
  const std::vector<TensorToWrite> tensors = {{"a", {64}, a.data()}, {"b", {8, 8}, b.data()}};
  ASSERT_TRUE(WriteShardedSafetensors(dir_, tensors, DType::kF32, 200).ok());
  EXPECT_TRUE(fs::exists(Path("model-00002-of-00002.safetensors")));
  EXPECT_TRUE(fs::exists(Path("model.safetensors.index.json")));

  ASSERT_TRUE(WriteShardedSafetensors(dir_, tensors, DType::kF32, 1 << 20).ok());
  EXPECT_TRUE(fs::exists(Path("model.safetensors")));
  EXPECT_FALSE(fs::exists(Path("model.safetensors.index.json")));
  EXPECT_FALSE(fs::exists(Path("model-00001-of-00002.safetensors")));
  EXPECT_FALSE(fs::exists(Path("model-00002-of-00002.safetensors")));
  auto ckpt = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->num_files(), 1);
  std::vector<float> got(64);
  ASSERT_TRUE((*ckpt)->ReadAsFloat("b", {8, 8}, got.data()).ok());
  EXPECT_EQ(got, b);

  ASSERT_TRUE(WriteShardedSafetensors(dir_, tensors, DType::kF32, 200).ok());
  EXPECT_FALSE(fs::exists(Path("model.safetensors")));
}

// ---------------------------------------------------------------------------------------------
// Broken inputs: each error names the file and says what is wrong.

void ExpectError(const absl::Status& status, const std::string& path, const std::string& what) {
  ASSERT_FALSE(status.ok()) << "expected an error about: " << what;
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status.message();
  EXPECT_TRUE(absl::StrContains(status.message(), what)) << status.message();
}

TEST_F(SafetensorsTest, TruncatedFileIsRefused) {
  const std::vector<float> x(32, 1.0f);
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w", {32}, x.data()}}, DType::kF32).ok());
  fs::resize_file(path, fs::file_size(path) - 5);
  ExpectError(SafetensorsFile::Open(path).status(), path, "past the end of the 123-byte data region (truncated?)");
}

TEST_F(SafetensorsTest, FileShorterThanHeaderLengthFieldIsRefused) {
  const std::string path = Path("tiny.safetensors");
  std::ofstream(path) << "abc";
  ExpectError(SafetensorsFile::Open(path).status(), path, "too short for the 8-byte header length");
}

TEST_F(SafetensorsTest, HeaderLengthLargerThanFileIsRefused) {
  const std::string path = Path("long.safetensors");
  {
    std::ofstream out(path, std::ios::binary);
    const uint64_t n = 1000;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{}";
  }
  ExpectError(SafetensorsFile::Open(path).status(), path,
              "header length 1000 is larger than the 2 bytes after it");
}

TEST_F(SafetensorsTest, HeaderThatIsNotJsonIsRefused) {
  const std::string path = WriteRaw("bad.safetensors", "{\"w\": {\"dtype\": ", 0);
  ExpectError(SafetensorsFile::Open(path).status(), path, "header is not valid JSON");
}

TEST_F(SafetensorsTest, OffsetsPastDataRegionAreRefused) {
  const std::string path = WriteRaw(
      "range.safetensors", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}})", 16);
  ExpectError(SafetensorsFile::Open(path).status(), path,
              "tensor w has data_offsets [16, 32] past the end of the 16-byte data region");
}

TEST_F(SafetensorsTest, OverlappingTensorsAreRefused) {
  const std::string path = WriteRaw("overlap.safetensors",
                                    R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                                    24);
  ExpectError(SafetensorsFile::Open(path).status(), path,
              "tensor b (bytes [8, 24)) overlaps tensor a (bytes [0, 16))");
}

TEST_F(SafetensorsTest, HolesAndTrailingBytesAreRefused) {
  const std::string hole = WriteRaw("hole.safetensors",
                                    R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})",
                                    20);
  ExpectError(SafetensorsFile::Open(hole).status(), hole, "bytes [8, 12) of the data region before tensor b");
  const std::string trailing = WriteRaw(
      "trailing.safetensors", R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 12);
  ExpectError(SafetensorsFile::Open(trailing).status(), trailing,
              "the data region has 12 bytes but the tensors cover only 8");
}

TEST_F(SafetensorsTest, ShapeTimesDtypeSizeMustEqualByteSpan) {
  const std::string path = WriteRaw(
      "span.safetensors", R"({"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 16]}})", 16);
  ExpectError(SafetensorsFile::Open(path).status(), path,
              "tensor w has shape [3, 2] of BF16, which needs 12 bytes, but data_offsets [0, 16] span 16 bytes");
}

TEST_F(SafetensorsTest, UnknownDtypeIsRefused) {
  const std::string path = WriteRaw(
      "dtype.safetensors", R"({"w": {"dtype": "F42", "shape": [2], "data_offsets": [0, 8]}})", 8);
  ExpectError(SafetensorsFile::Open(path).status(), path, "tensor w has unknown dtype 'F42'");
}

// A known dtype we cannot convert opens (a checkpoint may carry such buffers), but reading it fails.
TEST_F(SafetensorsTest, UnsupportedDtypeOpensButCannotBeRead) {
  const std::string path = WriteRaw(
      "i64.safetensors", R"({"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}})", 16);
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->info("ids")->dtype, DType::kI64);
  std::vector<float> out(2);
  ExpectError((*file)->ReadAsFloat("ids", {2}, out.data()), path,
              "tensor ids has dtype I64, which cannot be read as float (supported: F32, F16, BF16)");
}

TEST_F(SafetensorsTest, ShapeMismatchWithConfigNamesBothShapes) {
  const std::vector<float> w(64 * 32, 0.25f);
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"model.layers.0.self_attn.q_proj.weight", {64, 32}, w.data()}},
                               DType::kBF16).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<float> out(32 * 32);
  const absl::Status s = (*file)->ReadAsFloat("model.layers.0.self_attn.q_proj.weight", {32, 32}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), path + ": tensor model.layers.0.self_attn.q_proj.weight has shape [64, 32], "
                                "config expects [32, 32]");
}

TEST_F(SafetensorsTest, MissingTensorIsReported) {
  const std::vector<float> x(4, 1.0f);
  ASSERT_TRUE(WriteShardedSafetensors(dir_, {{"a", {4}, x.data()}}, DType::kF32, 1024).ok());
  auto file = SafetensorsFile::Open(Path("model.safetensors"));
  ASSERT_TRUE(file.ok());
  std::vector<float> out(4);
  const absl::Status s = (*file)->ReadAsFloat("lm_head.weight", {4}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  ExpectError(s, Path("model.safetensors"), "no tensor named lm_head.weight");
  EXPECT_FALSE((*file)->info("lm_head.weight").ok());

  auto ckpt = SafetensorsCheckpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok());
  EXPECT_FALSE((*ckpt)->contains("lm_head.weight"));
  const absl::Status c = (*ckpt)->ReadAsFloat("lm_head.weight", {4}, out.data());
  EXPECT_EQ(c.code(), absl::StatusCode::kNotFound);
  ExpectError(c, dir_, "tensor lm_head.weight is missing");
}

TEST_F(SafetensorsTest, MissingShardIsReported) {
  const std::vector<float> x(16, 1.0f);
  ASSERT_TRUE(WriteShardedSafetensors(dir_, {{"a", {16}, x.data()}, {"b", {16}, x.data()}},
                                      DType::kF32, 64).ok());
  fs::remove(Path("model-00002-of-00002.safetensors"));
  const absl::Status s = SafetensorsCheckpoint::Open(dir_).status();
  ExpectError(s, Path("model.safetensors.index.json"),
              "shard model-00002-of-00002.safetensors (holding b) cannot be loaded");
  EXPECT_TRUE(absl::StrContains(s.message(), "No such file")) << s.message();
}

TEST_F(SafetensorsTest, IndexPointingAtWrongShardIsReported) {
  const std::vector<float> x(16, 1.0f);
  ASSERT_TRUE(WriteShardedSafetensors(dir_, {{"a", {16}, x.data()}, {"b", {16}, x.data()}},
                                      DType::kF32, 64).ok());
  json index = json::parse(ReadAll(Path("model.safetensors.index.json")));
  index["weight_map"]["b"] = "model-00001-of-00002.safetensors";
  std::ofstream(Path("model.safetensors.index.json")) << index.dump();
  ExpectError(SafetensorsCheckpoint::Open(dir_).status(), Path("model.safetensors.index.json"),
              "weight_map puts tensor b in model-00001-of-00002.safetensors, but that shard has no such tensor");
}

TEST_F(SafetensorsTest, DirectoryWithoutWeightsIsReported) {
  ExpectError(SafetensorsCheckpoint::Open(dir_).status(), dir_,
              "has neither model.safetensors nor model.safetensors.index.json");
}

TEST_F(SafetensorsTest, WriterRefusesBadInputAndLeavesNoTempFile) {
  const std::vector<float> x(4, 1.0f);
  const std::string path = Path("w.safetensors");
  ExpectError(WriteSafetensors(path, {{"a", {4}, x.data()}, {"a", {4}, x.data()}}, DType::kF32),
              path, "tensor a given twice");
  ExpectError(WriteSafetensors(path, {{"a", {4}, x.data()}}, DType::kI32), path, "cannot write dtype I32");
  ExpectError(WriteSafetensors(path, {{"a", {-1}, x.data()}}, DType::kF32), path, "invalid shape [-1]");
  ExpectError(WriteShardedSafetensors(dir_, {{"a", {4}, x.data()}}, DType::kF32, 0), dir_,
              "max_shard_bytes must be > 0");
  const std::string nodir = Path("no/such/dir/w.safetensors");
  ExpectError(WriteSafetensors(nodir, {{"a", {4}, x.data()}}, DType::kF32), nodir, "cannot create");
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

// An existing file stays intact when a rewrite fails before the rename (here: the temp file
// cannot be created because a directory sits at its name).
TEST_F(SafetensorsTest, FailedRewriteKeepsPreviousFile) {
  const std::vector<float> x = {1, 2, 3, 4}, y = {5, 6, 7, 8};
  const std::string path = Path("keep.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"a", {4}, x.data()}}, DType::kF32).ok());
  const std::string before = ReadAll(path);
  fs::create_directory(path + ".tmp");
  ExpectError(WriteSafetensors(path, {{"a", {4}, y.data()}}, DType::kF32), path + ".tmp", "cannot create");
  EXPECT_EQ(ReadAll(path), before);
}

}  // namespace
}  // namespace dmc::model
