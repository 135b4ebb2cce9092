#include "trainer/schedules.h"

#include <algorithm>
#include <cmath>

namespace dmc::trainer {

const char* PhaseName(Phase phase) {
  switch (phase) {
    case Phase::kPretrain: return "pretrain";
    case Phase::kStage1: return "stage1";
    case Phase::kStage2: return "stage2";
    case Phase::kStage3: return "stage3";
    case Phase::kLoma: return "loma";
    case Phase::kDone: return "done";
  }
  return "?";
}

float WarmupCosine(int step, int steps, int warmup, float lr, float min_lr) {
  if (step < warmup) return lr * static_cast<float>(step + 1) / static_cast<float>(warmup);
  const int decay_steps = std::max(1, steps - warmup);
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / decay_steps);
  return static_cast<float>(min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress)));
}

ScheduleState ScheduleAt(const ScheduleConfig& c, int step) {
  ScheduleState s;
  const int lengths[] = {c.pretrain_steps, c.stage1_steps, c.stage2_steps, c.stage3_steps};
  const Phase phases[] = {Phase::kPretrain, Phase::kStage1, Phase::kStage2, Phase::kStage3};
  int begin = 0;
  for (int i = 0; i < 4; ++i) {
    if (step < begin + lengths[i]) {
      s.phase = phases[i];
      s.phase_step = step - begin;
      break;
    }
    begin += lengths[i];
  }
  s.phase_start = s.phase_step == 0;
  switch (s.phase) {
    case Phase::kPretrain:
      s.lr = WarmupCosine(s.phase_step, c.pretrain_steps, c.warmup_steps, c.lr, c.min_lr);
      break;
    case Phase::kStage1:
      s.lr = c.retrofit_lr;
      s.control_fade = std::max(0.0f, 1.0f - s.phase_step / (0.8f * c.stage1_steps));
      break;
    case Phase::kStage2:
      s.lr = c.retrofit_lr;
      s.cr_target = 1.0f + (c.cr_target - 1.0f) *
                               std::min(1.0f, static_cast<float>(s.phase_step) / c.stage2_steps);
      break;
    case Phase::kStage3:
      s.lr = WarmupCosine(s.phase_step, c.stage3_steps, 0, c.retrofit_lr, c.retrofit_min_lr);
      s.cr_target = c.cr_target;
      break;
    case Phase::kLoma:  // never scheduled: the trainer names LoMA's pre-training steps
    case Phase::kDone:
      s.cr_target = c.cr_target;
      break;
  }
  return s;
}

}  // namespace dmc::trainer
