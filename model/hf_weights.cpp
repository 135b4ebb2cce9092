#include "model/hf_weights.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace dmc::model {

template <typename Reader>
absl::Status ReadSlice(const Reader& reader, const ParamSpec& spec, float* out) {
  if (spec.split_dim < 0) return reader.ReadAsFloat(spec.name, spec.full_shape, out);
  std::vector<float> full(static_cast<size_t>(spec.full_shape[0]) * spec.full_shape[1]);
  if (absl::Status s = reader.ReadAsFloat(spec.name, spec.full_shape, full.data()); !s.ok())
    return s;
  const int64_t rows = spec.shape[0], cols = spec.shape[1], full_cols = spec.full_shape[1];
  const int64_t row0 = spec.split_dim == 0 ? spec.split_begin : 0;
  const int64_t col0 = spec.split_dim == 1 ? spec.split_begin : 0;
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(out + i * cols, full.data() + (row0 + i) * full_cols + col0, cols * sizeof(float));
  return absl::OkStatus();
}

template absl::Status ReadSlice<SafetensorsCheckpoint>(const SafetensorsCheckpoint&,
                                                       const ParamSpec&, float*);
template absl::Status ReadSlice<SafetensorsFile>(const SafetensorsFile&, const ParamSpec&,
                                                 float*);

absl::Status ImportHfWeights(const std::string& dir, Llama<float>* model) {
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt = SafetensorsCheckpoint::Open(dir);
  if (!ckpt.ok()) return ckpt.status();
  for (const ParamSpec& spec : model->param_specs()) {
    // A base model retrofitted with the DMS adapter has none yet: it starts as Llama::InitRandom
    // starts it, a unit norm and a zero projection (model/DMS.md §1).
    if (spec.name.find(".dms_proj_alpha") != std::string::npos && !(*ckpt)->contains(spec.name)) {
      float* w = model->params().data() + spec.offset;
      std::fill(w, w + spec.size, spec.shape.size() == 1 ? 1.0f : 0.0f);
      continue;
    }
    if (absl::Status s = ReadSlice(**ckpt, spec, model->params().data() + spec.offset); !s.ok())
      return s;
  }
  return absl::OkStatus();
}

}  // namespace dmc::model
