// Faults injected at exact points, for the tests of interruption, non-finite steps and failed
// saves: a test that stops a run "at step N" or "half-way through a save" must not depend on how
// fast the machine happens to be. Read from the environment variable DMC_FAULTS, which normal
// runs never set: a comma-separated list of
//
//   stop_after=N          SIGTERM to this process right after step N, as if it had come then
//   kill_in_save=N:WHERE  SIGKILL to this process inside the save of step N, WHERE being
//                         "tensors" (the temporary directory holds the tensor files, the step
//                         directory does not exist yet) or "renamed" (the step directory is in
//                         place, `latest` still names the previous checkpoint)
//   nan_grad=N:L[:K]      a NaN in the gradient of layer L's input norm on the first K attempts
//                         (default 1) at step N, on the last data- and tensor-parallel rank only,
//                         before the gradients are averaged: what an overflow on one rank does
//
// An environment variable and not a flag: dmc-train's flags must agree on every rank, and a fault
// may be meant for one rank (mpirun -x, or an MPMD launch).
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace dmc::trainer {

struct FaultPlan {
  enum class SavePoint { kTensors, kRenamed };

  int stop_after = 0;      // 0: none
  int kill_in_save = 0;    // step whose save is killed; 0: none
  SavePoint kill_point = SavePoint::kTensors;
  int nan_step = 0;        // 0: none
  int nan_layer = 0;
  int nan_attempts = 1;

  // Parses DMC_FAULTS (unset or empty: no faults); the error names the variable and the item.
  static absl::StatusOr<FaultPlan> FromEnv();
  static absl::StatusOr<FaultPlan> Parse(const std::string& text);

  // SIGKILL to this process when the save of `step` has reached `point`.
  void MaybeKillInSave(int step, SavePoint point) const;
};

}  // namespace dmc::trainer
