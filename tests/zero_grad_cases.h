// The configurations of the tests of ZeroGrad without a pass over the gradients (model/llama.h,
// model/llama_cuda.h; tests/test_model.cpp on the CPU model, tests/cuda/test_cuda_model.cpp on
// the GPU one): those whose first writers of the weight gradients differ. DMC off and on; an
// untied embedding table (written by the lookup's scatter, which only adds: zeroed first) and a
// tied one (written first by the LM head); DMS's query channel, and its adapter (frozen base)
// with eviction on and off (off, the adapter's branch does not run: zeroed).
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "model/config.h"

namespace dmc::testing {

struct ZeroGradCase {
  const char* name;
  bool dmc, tied;
  model::DmsVariant dms;
  bool eviction;
};

inline const ZeroGradCase kZeroGradCases[] = {
    {"untied", false, false, model::DmsVariant::kNone, false},
    {"tied", false, true, model::DmsVariant::kNone, false},
    {"dmc_untied", true, false, model::DmsVariant::kNone, false},
    {"dmc_tied", true, true, model::DmsVariant::kNone, false},
    {"dms_channel", false, false, model::DmsVariant::kQueryChannel, true},
    {"dms_adapter", false, false, model::DmsVariant::kAdapter, true},
    {"dms_adapter_off", false, false, model::DmsVariant::kAdapter, false},
};

inline std::string ZeroGradCaseName(const ::testing::TestParamInfo<ZeroGradCase>& info) {
  return info.param.name;
}

}  // namespace dmc::testing
