// AdamW over the model's flat parameter buffer, with global-norm gradient clipping. Moments are
// fp32 and laid out like the parameters, so a checkpoint stores them next to the weights.
//
// ZeRO-1 (OptimizerConfig::zero1 with a data-parallel group of d > 1 ranks; the layout and why it
// is exact are in model/zero1_shard.h): the moments are sharded over the DP group. This rank keeps
// m and v of its slice shard().slice of the flat buffer only, so m()[i] and v()[i] belong to
// parameter shard().slice.begin + i; Step updates that slice and all-gathers the parameters over
// the group. GatherMoments and SetMoments convert between the slice and the full moments that
// checkpoints hold.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "model/llama.h"
#include "model/zero1_shard.h"
#include "parallel/communicator.h"

namespace dmc::trainer {

struct OptimizerConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  float grad_clip = 1.0f;  // max global L2 norm; <= 0 disables clipping
  bool zero1 = false;      // shard the moments over the data-parallel group (ZeRO-1)
};

class AdamW {
 public:
  // dp: this rank's data-parallel group (null: none). With config.zero1 and dp of size > 1 the
  // moments are sharded over dp, which must then outlive the optimizer; otherwise dp is unused.
  AdamW(const OptimizerConfig& config, size_t num_params, parallel::Communicator* dp = nullptr);

  // Global L2 norm of the gradients of the whole model. tp is the tensor-parallel group: sharded
  // tensors are summed over it, replicated ones counted once.
  static absl::StatusOr<double> GradNorm(const model::Llama<float>& model,
                                         const std::vector<float>& grads,
                                         parallel::Communicator& tp);

  // One update at learning rate lr; returns the gradient norm before clipping. Sharded: updates
  // this rank's slice, then all-gathers the parameters over dp (collective). A non-finite norm
  // (the same on every rank: see Trainer::Step) skips the update: parameters, moments and step()
  // are left as they were.
  absl::StatusOr<double> Step(model::Llama<float>& model, float lr, parallel::Communicator& tp);

  // Forget the moments (between DMC stages, as the reference does).
  void Reset();

  int step() const { return step_; }
  void set_step(int step) { step_ = step; }
  // The moments this rank keeps: those of shard().slice (the whole buffer unless sharded).
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }
  const std::vector<float>& m() const { return m_; }
  const std::vector<float>& v() const { return v_; }
  bool sharded() const { return dp_ != nullptr; }
  const model::Zero1Shard& shard() const { return shard_; }

  // The full moments (num_params each), for a checkpoint: a copy of m() and v(), or, sharded,
  // every DP rank's slice gathered (collective over dp).
  absl::Status GatherMoments(std::vector<float>* m, std::vector<float>* v) const;
  // Sets the moments from full ones (num_params each, from a checkpoint), keeping this rank's
  // slice. InvalidArgument on another size.
  absl::Status SetMoments(const std::vector<float>& m, const std::vector<float>& v);

 private:
  OptimizerConfig config_;
  size_t num_params_;
  parallel::Communicator* dp_;  // null unless sharded
  model::Zero1Shard shard_;
  int step_ = 0;  // updates taken since the last Reset
  std::vector<float> m_, v_;
};

}  // namespace dmc::trainer
