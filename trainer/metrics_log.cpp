#include "trainer/metrics_log.h"

#include <cerrno>
#include <cstring>

#include "nlohmann/json.hpp"

namespace dmc::trainer {

absl::StatusOr<std::unique_ptr<MetricsLog>> MetricsLog::Open(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (!f)
    return absl::FailedPreconditionError(path + ": cannot open metrics log: " + std::strerror(errno));
  return std::unique_ptr<MetricsLog>(new MetricsLog(f));
}

MetricsLog::~MetricsLog() { std::fclose(file_); }

absl::Status MetricsLog::Write(const StepMetrics& m) {
  nlohmann::json j = {{"step", m.step},           {"phase", PhaseName(m.phase)},
                      {"loss", m.loss},           {"lm_loss", m.lm_loss},
                      {"cr_loss", m.cr_loss},     {"rep_loss", m.rep_loss},
                      {"distill_loss", m.distill_loss},
                      {"lr", m.lr},
                      {"grad_norm", m.grad_norm}, {"cr_target", m.cr_target},
                      {"achieved_cr", m.achieved_cr}, {"tokens_per_second", m.tokens_per_second},
                      {"mfu", m.mfu},             {"tokens", m.tokens},
                      {"skipped", m.skipped},     {"bad_steps", m.bad_steps}};
  const std::string line = j.dump() + "\n";
  if (std::fputs(line.c_str(), file_) < 0 || std::fflush(file_) != 0)
    return absl::DataLossError(std::string("metrics log write failed: ") + std::strerror(errno));
  return absl::OkStatus();
}

}  // namespace dmc::trainer
