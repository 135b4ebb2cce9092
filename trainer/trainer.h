// The training loop: schedules → micro-batches → forward/backward → data-parallel gradient
// average → clip + AdamW → metrics. Everything the loop needs from outside (batches, the process
// groups) comes in through small interfaces, so tests drive it with fixed batches.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/llama.h"
#include "model/loma.h"
#include "parallel/communicator.h"
#include "trainer/backend.h"
#include "trainer/fault_injection.h"
#include "trainer/optimizer.h"
#include "trainer/schedules.h"

namespace dmc::trainer {

struct TrainConfig {
  int seq_len = 256;
  int micro_batch = 8;   // sequences per micro-batch per data-parallel rank
  int grad_accum = 1;    // micro-batches per optimizer step
  uint64_t seed = 1234;  // weights (when not imported) and DMC noise
  ScheduleConfig schedule;
  OptimizerConfig optimizer;
  int log_every = 10;
  double peak_tflops = 0;  // per rank, for MFU; 0 = unknown (CPU): MFU is not printed
  // LoMA retrofitting when loma.enabled() (model::MakeLomaLayout): every plain batch is turned
  // into the LoMA layout (model::LomaTransform) and trained with StepOptions::loma on the
  // pre-training schedule. The model must carry this layout (model::AddLomaTokens with its zones).
  model::LomaLayout loma;
  // Non-finite steps: an attempt whose loss or gradient norm is not finite on any rank is skipped
  // on every rank (weights, moments and the step counter unchanged; its batch is consumed, so the
  // data cursor moves on). This many in a row stop the run with an error (Step fails).
  int max_bad_steps = 10;
  // Test hooks (trainer/fault_injection.h): the NaN of nan_grad is injected by Step.
  FaultPlan faults;

  // Rejects inconsistent values (non-positive sizes, CR < 1, a sequence longer than the model's
  // positions, a LoMA window that is not whole segments, DMC stages with LoMA, ...) with a
  // message naming the flag, before any work starts.
  absl::Status Validate(const model::LlamaConfig& model) const;
};

// Fills inputs and targets with micro_batch × seq_len tokens each.
using BatchSource =
    std::function<absl::Status(std::vector<int32_t>* inputs, std::vector<int32_t>* targets)>;

struct StepMetrics {
  int step = 0;  // 1-based number of optimizer steps taken
  Phase phase = Phase::kDone;
  double loss = 0, lm_loss = 0, cr_loss = 0;
  double rep_loss = 0;  // LoMA repetition-zone loss (0 without LoMA)
  double distill_loss = 0;  // DMS: KL(student || teacher) (0 without DMS)
  double lr = 0, grad_norm = 0;
  double cr_target = 1, achieved_cr = 1;  // LoMA: both its fixed ratio c
  double tokens_per_second = 0;
  double mfu = 0;
  int64_t tokens = 0;  // tokens consumed so far, all ranks (LoMA: text tokens)
  // The attempt had a non-finite loss or gradient norm and was skipped (step is then the step it
  // attempted, which the next attempt takes again).
  bool skipped = false;
  int bad_steps = 0;  // attempts skipped since this Trainer was made
};

class Trainer {
 public:
  // dp and tp are the data- and tensor-parallel groups of this rank (size 1 when not parallel);
  // the model must have been built with the same tp group. backend: where the steps run; null
  // trains the host model on the CPU (CpuBackend). A device backend starts from the host model's
  // current weights (it copies them when it is built); see SyncToHost / SyncFromHost.
  Trainer(const TrainConfig& config, model::Llama<float>* model, BatchSource batches,
          parallel::Communicator* dp, parallel::Communicator* tp,
          std::unique_ptr<TrainBackend> backend = nullptr);

  // Runs one optimizer step; the step counter advances only on success. A non-finite attempt is
  // skipped (StepMetrics::skipped; see TrainConfig::max_bad_steps), and the max_bad_steps-th in a
  // row returns Aborted. A batch that fails to load on any data-parallel rank fails the step on
  // every rank with that rank's error. With LoMA, fails if the model does not carry config.loma
  // (its vocabulary would not hold <m> and <r>).
  absl::StatusOr<StepMetrics> Step();
  // Runs until the schedule is done, printing a progress line every log_every steps (rank 0).
  absl::Status Run(const std::function<absl::Status(const StepMetrics&)>& after_step = nullptr);

  int step() const { return step_; }
  void set_step(int step) { step_ = step; }
  int64_t tokens() const { return tokens_; }
  void set_tokens(int64_t tokens) { tokens_ = tokens; }
  AdamW& optimizer() { return optimizer_; }
  TrainBackend& backend() { return *backend_; }
  // The backend's weights and optimizer state → model() and optimizer(): call before a checkpoint
  // save or an export (a no-op on the CPU). SyncFromHost goes the other way, after a checkpoint
  // load.
  absl::Status SyncToHost() { return backend_->SyncToHost(model_, &optimizer_); }
  absl::Status SyncFromHost() { return backend_->SyncFromHost(*model_, optimizer_); }
  const TrainConfig& config() const { return config_; }

  // Model FLOPs per token of one training step (6 · parameters + attention), for MFU; with LoMA
  // per text token, which costs (2c + 1) / c layout positions.
  double FlopsPerToken() const;

 private:
  // Applies the phase changes of the schedule at the start of a phase.
  void EnterPhase(const ScheduleState& state);
  // The nan_grad fault: whether this attempt poisons a gradient here (and counts it).
  bool InjectNanNow();

  TrainConfig config_;
  model::Llama<float>* model_;
  BatchSource batches_;
  parallel::Communicator* dp_;
  parallel::Communicator* tp_;
  AdamW optimizer_;
  std::unique_ptr<TrainBackend> backend_;
  int step_ = 0;
  int64_t tokens_ = 0;
  bool dmc_on_ = false;
  int bad_steps_ = 0, bad_in_a_row_ = 0;
  int nan_injected_ = 0;  // attempts poisoned by the nan_grad fault
};

// The progress line every log_every steps; LoMA steps show the repetition loss and the fixed CR
// instead of the CR loss and the CR target.
std::string FormatProgress(const StepMetrics& m, int total_steps);

}  // namespace dmc::trainer
