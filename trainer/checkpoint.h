// Training checkpoints: everything a run needs to continue bit-exactly.
//
// DIR/step_00000100/
//   model-tp0.safetensors   fp32 weights of tensor-parallel rank 0 (HF names, local shapes)
//   optim-tp0.safetensors   its AdamW moments (exp_avg.NAME, exp_avg_sq.NAME)
//   ...                     one pair per TP rank, written by that rank's first DP replica
//   trainer.json            step, tokens, optimizer step, loader cursor, seed, layout, model config
// DIR/latest                the name of the newest complete checkpoint
//
// A save goes into DIR/.tmp-step_N, is fsynced, and only then renamed to DIR/step_N and named in
// `latest` (itself replaced atomically), so an interrupted save never damages the previous
// checkpoint. DMC noise is a pure function of (seed, step), so no RNG state beyond the loader
// cursor is needed. Optimizer and model state are independent of the data-parallel size and of
// ZeRO-1: with sharded moments (trainer/optimizer.h) a save gathers them over the DP group for the
// writer, and a load reads the full moments and keeps this rank's slice.
//
// A save that fails part-way (a full disk, a write error, on any rank) returns the same error on
// every rank and removes its temporary directory; `latest` and the checkpoints it names are left
// as they were. What the run does then is the trainer's rule (README: "Checkpoints").
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/llama.h"
#include "parallel/communicator.h"
#include "trainer/fault_injection.h"
#include "trainer/optimizer.h"

namespace dmc::trainer {

struct TrainingState {
  int step = 0;
  int64_t tokens = 0;
  int optimizer_step = 0;
  std::string loader_cursor;  // data::LoaderCursor::ToString()
  uint64_t seed = 0;
  // DMS query-channel variant: a hash of the teacher's weights (the --init_from model, which is
  // not saved again); "" when the run has no separate teacher.
  std::string teacher;
};

// FNV-1a over the bytes of a weight buffer, as 16 hex digits: how a checkpoint records weights it
// does not hold (TrainingState::teacher).
std::string WeightsHash(const std::vector<float>& weights);

class Checkpointer {
 public:
  // world: every rank of the job (saves synchronise on it); tp_rank/dp_rank: this rank's place.
  Checkpointer(std::string dir, int keep_last, parallel::Communicator* world, int tp_rank,
               int tp_size, int dp_rank);

  // Collective over world (and, with ZeRO-1, over the optimizer's DP group).
  absl::Status Save(const model::Llama<float>& model, const AdamW& optimizer,
                    const TrainingState& state);

  // Loads the checkpoint named by DIR/latest into model and optimizer. Errors name the file: a
  // missing `latest`, a checkpoint of another model config or TP size, a damaged tensor file.
  absl::StatusOr<TrainingState> LoadLatest(model::Llama<float>& model, AdamW& optimizer) const;

  static std::string StepDirName(int step);
  // Test hook: kill this process at a chosen point of a chosen save (trainer/fault_injection.h).
  void set_faults(const FaultPlan& faults) { faults_ = faults; }

 private:
  absl::Status Prune() const;
  // Writes this rank's part of the checkpoint into tmp (the tensor files on the first DP replica,
  // the trainer state and config on the leader).
  absl::Status WriteFiles(const std::filesystem::path& tmp, const model::Llama<float>& model,
                          const AdamW& optimizer, const TrainingState& state) const;
  // The error of a save that failed, naming the checkpoint and saying what was kept.
  absl::Status SaveFailed(const std::string& name, const absl::Status& cause) const;
  // The leader's part after every rank wrote: tmp → the step directory, then `latest`, then prune.
  absl::Status Publish(const std::filesystem::path& tmp, const std::string& name, int step) const;

  std::string dir_;
  int keep_last_;
  parallel::Communicator* world_;
  int tp_rank_, tp_size_, dp_rank_;
  FaultPlan faults_;
};

}  // namespace dmc::trainer
