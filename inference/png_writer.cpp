#include "inference/png_writer.h"

#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <memory>

#include "absl/strings/str_format.h"

namespace dmc::inference {
namespace {

void PutU32(std::vector<uint8_t>& out, uint32_t x) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(x >> s));
}

// length, type, data, CRC over type and data.
void Chunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& data) {
  PutU32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  PutU32(out, static_cast<uint32_t>(crc32(0L, out.data() + start, out.size() - start)));
}

}  // namespace

absl::Status WritePng(const std::string& path, int width, int height,
                      const std::vector<uint8_t>& rgb) {
  if (width <= 0 || height <= 0 || rgb.size() != size_t(width) * height * 3)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: a %dx%d RGB image needs %d bytes, got %d", path, width, height,
        size_t(std::max(width, 0)) * std::max(height, 0) * 3, rgb.size()));
  // Each scanline starts with filter type 0 (none).
  std::vector<uint8_t> raw;
  raw.reserve(size_t(height) * (1 + 3 * size_t(width)));
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb.begin() + size_t(y) * width * 3,
               rgb.begin() + size_t(y + 1) * width * 3);
  }
  uLongf packed_size = compressBound(raw.size());
  std::vector<uint8_t> packed(packed_size);
  if (compress2(packed.data(), &packed_size, raw.data(), raw.size(), 9) != Z_OK)
    return absl::InternalError(absl::StrFormat("%s: zlib compression failed", path));
  packed.resize(packed_size);

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<uint8_t> header;
  PutU32(header, static_cast<uint32_t>(width));
  PutU32(header, static_cast<uint32_t>(height));
  header.insert(header.end(), {8, 2, 0, 0, 0});  // 8-bit, RGB, deflate, adaptive filters, no interlace
  Chunk(png, "IHDR", header);
  Chunk(png, "IDAT", packed);
  Chunk(png, "IEND", {});

  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "wb"), &std::fclose);
  if (!f) return absl::NotFoundError(absl::StrFormat("%s: cannot open for writing", path));
  if (std::fwrite(png.data(), 1, png.size(), f.get()) != png.size())
    return absl::DataLossError(absl::StrFormat("%s: write failed", path));
  return absl::OkStatus();
}

}  // namespace dmc::inference
