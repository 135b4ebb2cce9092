// Pieces of the inference tools: next-token choice (kernels/sample.h) and the PNG writer of the
// CR heat maps.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>

#include "inference/png_writer.h"
#include "kernels/sample.h"

namespace dmc {
namespace {

// One row through kernels::sample_tokens: the token at `position` for these settings.
int32_t Sample(const std::vector<float>& logits, float temperature, float top_p, uint64_t seed,
               int32_t position) {
  int32_t next = -1;
  const kernels::SampleRows rows{&temperature, &top_p, &seed, &position, nullptr};
  kernels::sample_tokens(&next, nullptr, nullptr, logits.data(), 1, static_cast<int>(logits.size()),
                         rows);
  return next;
}

TEST(InferenceSampler, GreedyNucleusAndSeeds) {
  const std::vector<float> logits = {0.1f, 2.0f, 1.9f, -1.0f};
  EXPECT_EQ(Sample(logits, 0.0f, 1.0f, 7, 0), 1);
  // A nucleus smaller than the top token's mass leaves only the top token.
  for (int pos = 0; pos < 50; ++pos) EXPECT_EQ(Sample(logits, 1.0f, 0.01f, 7, pos), 1);
  // Full sampling visits the likely tokens in proportion; a draw is a function of (seed,
  // position) alone, and other seeds give other draws.
  std::map<int, int> counts;
  int differ = 0;
  for (int pos = 0; pos < 4000; ++pos) {
    const int x = Sample(logits, 1.0f, 1.0f, 42, pos);
    EXPECT_EQ(x, Sample(logits, 1.0f, 1.0f, 42, pos));
    differ += x != Sample(logits, 1.0f, 1.0f, 43, pos);
    ++counts[x];
  }
  EXPECT_GT(differ, 1000);
  // softmax: p1 ≈ 0.47, p2 ≈ 0.43, p0 ≈ 0.07, p3 ≈ 0.02
  EXPECT_NEAR(counts[1] / 4000.0, 0.47, 0.04);
  EXPECT_NEAR(counts[2] / 4000.0, 0.43, 0.04);
  EXPECT_GT(counts[3], 0);
  // top_p 0.9 drops the two unlikely tokens.
  for (int pos = 0; pos < 500; ++pos) {
    const int x = Sample(logits, 1.0f, 0.9f, 1, pos);
    EXPECT_TRUE(x == 1 || x == 2) << x;
  }
}

TEST(InferenceSampler, LogprobOfTargetOrChoiceAndArgmax) {
  const std::vector<float> logits = {0.5f, -1.0f, 3.0f, 3.0f, 1.0f, 0.0f};  // [2 rows, 3]
  const float temperature[2] = {0.0f, 0.0f}, top_p[2] = {1.0f, 1.0f};
  const uint64_t seed[2] = {0, 0};
  const int32_t position[2] = {0, 0}, target[2] = {1, -1};
  int32_t next[2], argmax[2];
  float logprob[2];
  kernels::sample_tokens(next, logprob, argmax, logits.data(), 2, 3,
                         {temperature, top_p, seed, position, target});
  EXPECT_EQ(argmax[0], 2);
  EXPECT_EQ(argmax[1], 0);  // ties go to the lowest id
  EXPECT_EQ(next[1], 0);
  const double z0 = std::exp(0.5) + std::exp(-1.0) + std::exp(3.0);
  const double z1 = std::exp(3.0) + std::exp(1.0) + std::exp(0.0);
  EXPECT_NEAR(logprob[0], -1.0 - std::log(z0), 1e-6);  // the target's
  EXPECT_NEAR(logprob[1], 3.0 - std::log(z1), 1e-6);   // the chosen token's
}

uint32_t ReadU32(const std::string& s, size_t at) {
  return uint32_t(uint8_t(s[at])) << 24 | uint32_t(uint8_t(s[at + 1])) << 16 |
         uint32_t(uint8_t(s[at + 2])) << 8 | uint32_t(uint8_t(s[at + 3]));
}

TEST(InferencePng, WritesAValidImage) {
  const std::string path = std::string(DMC_BINARY_DIR) + "/inference_png_test.png";
  const int w = 3, h = 2;
  std::vector<uint8_t> rgb(w * h * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 13);
  ASSERT_TRUE(inference::WritePng(path, w, h, rgb).ok());
  std::ifstream in(path, std::ios::binary);
  const std::string png((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::remove(path.c_str());
  ASSERT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  // Walk the chunks, check every CRC, and inflate the image data back.
  std::string idat;
  size_t at = 8;
  int chunks = 0;
  while (at < png.size()) {
    const uint32_t n = ReadU32(png, at);
    const std::string type = png.substr(at + 4, 4);
    const uint32_t crc = crc32(0L, reinterpret_cast<const Bytef*>(png.data() + at + 4), n + 4);
    ASSERT_EQ(crc, ReadU32(png, at + 8 + n)) << type;
    if (type == "IHDR") {
      EXPECT_EQ(ReadU32(png, at + 8), uint32_t(w));
      EXPECT_EQ(ReadU32(png, at + 12), uint32_t(h));
    }
    if (type == "IDAT") idat += png.substr(at + 8, n);
    at += 12 + n;
    ++chunks;
  }
  EXPECT_EQ(chunks, 3);
  std::vector<uint8_t> raw(h * (1 + w * 3));
  uLongf size = raw.size();
  ASSERT_EQ(uncompress(raw.data(), &size, reinterpret_cast<const Bytef*>(idat.data()), idat.size()),
            Z_OK);
  ASSERT_EQ(size, raw.size());
  for (int y = 0; y < h; ++y) {
    EXPECT_EQ(raw[y * (1 + w * 3)], 0) << "filter type";
    for (int i = 0; i < w * 3; ++i) EXPECT_EQ(raw[y * (1 + w * 3) + 1 + i], rgb[y * w * 3 + i]);
  }
  EXPECT_FALSE(inference::WritePng(path, w, h, std::vector<uint8_t>(5)).ok());
  const absl::Status bad = inference::WritePng("/nonexistent-dir/x.png", w, h, rgb);
  EXPECT_NE(bad.message().find("/nonexistent-dir/x.png"), std::string::npos) << bad;
}

}  // namespace
}  // namespace dmc
