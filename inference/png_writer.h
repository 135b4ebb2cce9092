// A minimal PNG writer (8-bit RGB, no interlace, one zlib-compressed IDAT chunk): enough for the
// per-head compression heat maps of dmc-eval without an image library.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace dmc::inference {

// rgb holds height rows of width pixels, 3 bytes each. Errors name the file.
absl::Status WritePng(const std::string& path, int width, int height,
                      const std::vector<uint8_t>& rgb);

}  // namespace dmc::inference
