#include "trainer/fault_injection.h"

#include <csignal>
#include <cstdlib>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace dmc::trainer {

absl::StatusOr<FaultPlan> FaultPlan::FromEnv() {
  const char* text = std::getenv("DMC_FAULTS");
  return Parse(text == nullptr ? "" : text);
}

absl::StatusOr<FaultPlan> FaultPlan::Parse(const std::string& text) {
  FaultPlan plan;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    auto bad = [&] {
      return absl::InvalidArgumentError(
          "DMC_FAULTS: cannot parse '" + std::string(item) +
          "' (expected stop_after=N, kill_in_save=N:tensors|renamed or nan_grad=N:LAYER[:K])");
    };
    const std::vector<std::string> kv = absl::StrSplit(item, '=');
    if (kv.size() != 2) return bad();
    const std::vector<std::string> args = absl::StrSplit(kv[1], ':');
    std::vector<int> n(args.size(), 0);
    for (size_t i = 0; i < args.size(); ++i)
      if (!absl::SimpleAtoi(args[i], &n[i]) || n[i] < 0) n[i] = -1;
    if (kv[0] == "stop_after" && args.size() == 1 && n[0] > 0) {
      plan.stop_after = n[0];
    } else if (kv[0] == "kill_in_save" && args.size() == 2 && n[0] > 0 &&
               (args[1] == "tensors" || args[1] == "renamed")) {
      plan.kill_in_save = n[0];
      plan.kill_point = args[1] == "tensors" ? SavePoint::kTensors : SavePoint::kRenamed;
    } else if (kv[0] == "nan_grad" && (args.size() == 2 || args.size() == 3) && n[0] > 0 &&
               n[1] >= 0 && (args.size() == 2 || n[2] > 0)) {
      plan.nan_step = n[0];
      plan.nan_layer = n[1];
      plan.nan_attempts = args.size() == 3 ? n[2] : 1;
    } else {
      return bad();
    }
  }
  return plan;
}

void FaultPlan::MaybeKillInSave(int step, SavePoint point) const {
  if (kill_in_save > 0 && kill_in_save == step && kill_point == point) std::raise(SIGKILL);
}

}  // namespace dmc::trainer
