// JSON-lines metrics sink: one object per optimizer step, for plots and for comparing runs.
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "trainer/trainer.h"

namespace dmc::trainer {

class MetricsLog {
 public:
  // Appends to path (a resumed run continues the same log).
  static absl::StatusOr<std::unique_ptr<MetricsLog>> Open(const std::string& path);
  ~MetricsLog();
  absl::Status Write(const StepMetrics& m);

 private:
  explicit MetricsLog(std::FILE* file) : file_(file) {}
  std::FILE* file_;
};

}  // namespace dmc::trainer
