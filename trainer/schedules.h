// Learning-rate and DMC schedules as pure functions of the global step, so a resumed run needs
// no schedule state beyond the step counter.
//
// A run walks through up to four phases, in order (model/DMC.md §2, §4, §5):
//   pretrain  DMC off, warmup + cosine from lr to min_lr (for models trained from scratch)
//   stage 1   DMC off, the control channel fades out: m = max(0, 1 - s / (0.8 · steps))
//   stage 2   DMC on, CR target ramps linearly from 1 to cr_target over the whole stage,
//             constant retrofit_lr
//   stage 3   DMC on, CR target held at cr_target, cosine from retrofit_lr to retrofit_min_lr
// At the start of stage 2 the control-channel weight rows are zeroed and the optimizer state is
// reset (the reference does not carry it between stages).
// LoMA retrofitting (TrainConfig::loma) runs the pre-training schedule on batches in the LoMA
// layout; the trainer reports those steps as phase "loma".
#pragma once

#include <string>

namespace dmc::trainer {

enum class Phase { kPretrain, kStage1, kStage2, kStage3, kLoma, kDone };
const char* PhaseName(Phase phase);

struct ScheduleConfig {
  int pretrain_steps = 0;
  int stage1_steps = 0;
  int stage2_steps = 0;
  int stage3_steps = 0;
  float lr = 3e-4f;
  float min_lr = 3e-5f;
  int warmup_steps = 0;
  float retrofit_lr = 3e-5f;
  float retrofit_min_lr = 3e-6f;
  float cr_target = 1.0f;

  int total_steps() const { return pretrain_steps + stage1_steps + stage2_steps + stage3_steps; }
};

struct ScheduleState {
  Phase phase = Phase::kDone;
  int phase_step = 0;       // step within the phase, 0-based
  bool phase_start = false; // first step of the phase
  float lr = 0;
  float cr_target = 1;      // 1 = no compression asked
  float control_fade = 1;   // stage-1 multiplier of the control channel
  bool dmc_enabled() const { return phase == Phase::kStage2 || phase == Phase::kStage3; }
  // prior p = 1 - 1/CR of the CR loss
  float cr_prior() const { return dmc_enabled() ? 1.0f - 1.0f / cr_target : 0.0f; }
};

// Schedule at global step s (0-based).
ScheduleState ScheduleAt(const ScheduleConfig& config, int step);

// Warmup (linear from lr/warmup) then cosine from lr down to min_lr at the end of the phase.
float WarmupCosine(int step, int steps, int warmup, float lr, float min_lr);

}  // namespace dmc::trainer
