#include "trainer/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include "absl/strings/str_format.h"

namespace dmc::trainer {

absl::Status TrainConfig::Validate(const model::LlamaConfig& model) const {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError("invalid training config: " + what);
  };
  if (seq_len <= 0) return bad(absl::StrFormat("--seq_len must be > 0, got %d", seq_len));
  if (seq_len > model.max_position_embeddings)
    return bad(absl::StrFormat("--seq_len %d exceeds the model's max_position_embeddings %d",
                               seq_len, model.max_position_embeddings));
  if (micro_batch <= 0) return bad(absl::StrFormat("--micro_batch must be > 0, got %d", micro_batch));
  if (grad_accum <= 0) return bad(absl::StrFormat("--grad_accum must be > 0, got %d", grad_accum));
  const ScheduleConfig& s = schedule;
  for (auto [name, v] : {std::pair{"--pretrain_steps", s.pretrain_steps},
                         std::pair{"--stage1_steps", s.stage1_steps},
                         std::pair{"--stage2_steps", s.stage2_steps},
                         std::pair{"--stage3_steps", s.stage3_steps},
                         std::pair{"--warmup_steps", s.warmup_steps}})
    if (v < 0) return bad(absl::StrFormat("%s must be >= 0, got %d", name, v));
  if (loma.enabled()) {
    if (loma.zones.c < 1) return bad(absl::StrFormat("--loma_c must be >= 1, got %d", loma.zones.c));
    if (seq_len % loma.zones.segment() != 0)
      return bad(absl::StrFormat(
          "--seq_len %d must be a multiple of --loma_t × --loma_c = %d (LoMA compresses whole "
          "segments)",
          seq_len, loma.zones.segment()));
    for (auto [name, v] : {std::pair{"--stage1_steps", s.stage1_steps},
                           std::pair{"--stage2_steps", s.stage2_steps},
                           std::pair{"--stage3_steps", s.stage3_steps}})
      if (v != 0)
        return bad(absl::StrFormat(
            "%s must be 0 with --method=loma (LoMA trains on the pre-training schedule: "
            "--pretrain_steps, --lr, --min_lr, --warmup_steps), got %d",
            name, v));
  }
  if (s.total_steps() <= 0) return bad("the schedule has no steps (set --pretrain_steps or --stage*_steps)");
  if (!(s.cr_target >= 1.0f))
    return bad(absl::StrFormat("--cr_target must be >= 1 (a compression ratio), got %g", s.cr_target));
  for (auto [name, v] : {std::pair{"--lr", s.lr}, std::pair{"--min_lr", s.min_lr},
                         std::pair{"--retrofit_lr", s.retrofit_lr},
                         std::pair{"--retrofit_min_lr", s.retrofit_min_lr},
                         std::pair{"--weight_decay", optimizer.weight_decay}})
    if (!(v >= 0)) return bad(absl::StrFormat("%s must be >= 0, got %g", name, v));
  if (!(optimizer.beta1 >= 0 && optimizer.beta1 < 1 && optimizer.beta2 >= 0 && optimizer.beta2 < 1))
    return bad("AdamW betas must lie in [0, 1)");
  if ((s.stage2_steps > 0 || s.stage3_steps > 0) && s.cr_target == 1.0f)
    return bad("DMC stages need --cr_target > 1");
  if (log_every <= 0) return bad(absl::StrFormat("--log_every must be > 0, got %d", log_every));
  if (max_bad_steps <= 0)
    return bad(absl::StrFormat("--max_bad_steps must be > 0, got %d", max_bad_steps));
  if (faults.nan_step > 0 && faults.nan_layer >= model.num_hidden_layers)
    return bad(absl::StrFormat("DMC_FAULTS nan_grad: layer %d of a model of %d layers",
                               faults.nan_layer, model.num_hidden_layers));
  return absl::OkStatus();
}

Trainer::Trainer(const TrainConfig& config, model::Llama<float>* model, BatchSource batches,
                 parallel::Communicator* dp, parallel::Communicator* tp,
                 std::unique_ptr<TrainBackend> backend)
    : config_(config),
      model_(model),
      batches_(std::move(batches)),
      dp_(dp),
      tp_(tp),
      optimizer_(config.optimizer, model->params().size(), dp),
      backend_(std::move(backend)) {
  if (!backend_) backend_ = std::make_unique<CpuBackend>(model_, &optimizer_, tp_, dp_);
}

double Trainer::FlopsPerToken() const {
  const model::LlamaConfig& c = model_->config();
  // 6 FLOPs per parameter per token (forward 2, backward 4) for the matrices, plus attention's
  // two T×T products per layer (causal: half of them), also times 3 for the backward.
  const kernels::LomaZones& z = config_.loma.zones;
  const double positions = z.enabled() ? static_cast<double>(z.chunk()) / z.segment() : 1.0;
  const double matrices = 6.0 * static_cast<double>(c.num_parameters() -
                                                    static_cast<long>(c.vocab_size) * c.hidden_size);
  const double attention = 6.0 * c.num_hidden_layers * c.hidden_size * config_.seq_len * positions;
  return (matrices + attention) * positions;
}

void Trainer::EnterPhase(const ScheduleState& state) {
  model_->set_compression_enabled(state.dmc_enabled());
  backend_->SetCompressionEnabled(state.dmc_enabled());
  if (!state.phase_start || step_ == 0) return;
  // The reference carries no optimizer state from one stage to the next.
  backend_->ResetOptimizer();
  // Stage 2 starts from a = -init_val and omega = sigmoid(init_val) exactly (model/DMC.md §2).
  if (state.phase == Phase::kStage2) backend_->ZeroControlChannelRows();
}

bool Trainer::InjectNanNow() {
  const FaultPlan& f = config_.faults;
  const bool last_rank = dp_->rank() == dp_->size() - 1 && tp_->rank() == tp_->size() - 1;
  if (f.nan_step != step_ + 1 || nan_injected_ >= f.nan_attempts) return false;
  ++nan_injected_;
  return last_rank;
}

absl::StatusOr<StepMetrics> Trainer::Step() {
  const ScheduleState sched = ScheduleAt(config_.schedule, step_);
  if (sched.phase == Phase::kDone) return absl::OutOfRangeError("the schedule is finished");
  const model::LomaLayout& loma = config_.loma;
  const model::LomaLayout& carried = model_->config().loma;
  if (loma.enabled() && (carried.zones.t != loma.zones.t || carried.zones.c != loma.zones.c ||
                         carried.memory_token != loma.memory_token ||
                         carried.repetition_token != loma.repetition_token))
    return absl::FailedPreconditionError(absl::StrFormat(
        "the model does not carry the LoMA layout t %d, c %d (<m> %d, <r> %d) it is trained "
        "with: grow it with model::AddLomaTokens",
        loma.zones.t, loma.zones.c, loma.memory_token, loma.repetition_token));
  EnterPhase(sched);
  const auto start = std::chrono::steady_clock::now();

  model::StepOptions options;
  options.mode = kernels::DmcDecisionMode::kRelaxed;
  options.noise_seed = config_.seed;
  options.step = static_cast<uint64_t>(step_);
  options.cr_prior = sched.cr_prior();
  options.control_fade = sched.control_fade;
  options.loma = loma.zones;

  const int B = config_.micro_batch, T = config_.seq_len;
  const bool inject_nan = InjectNanNow();
  std::vector<int32_t> inputs, targets;
  backend_->ZeroGrad();
  double loss = 0, lm_loss = 0, cr_loss = 0, rep_loss = 0, distill = 0, merge = 0;
  for (int micro = 0; micro < config_.grad_accum; ++micro) {
    // A batch that fails to load (a damaged shard) on one data-parallel rank stops every rank,
    // with that rank's error, before any of them uses its batch.
    if (absl::Status s = parallel::AgreeOnStatus(*dp_, batches_(&inputs, &targets)); !s.ok())
      return s;
    if (inputs.size() != static_cast<size_t>(B) * T || targets.size() != inputs.size())
      return absl::InternalError(absl::StrFormat("batch source gave %d tokens, expected %d × %d",
                                                 inputs.size(), B, T));
    // Global index of the first sequence, in the loader's order (micro-batch m of a step is a
    // global batch whose slice r belongs to DP rank r): the same noise for every DP layout.
    options.seq0 = (static_cast<long>(micro) * dp_->size() + dp_->rank()) * B;
    int seq_len = T;
    if (loma.enabled()) {
      absl::StatusOr<model::LomaBatch> layout =
          model::LomaTransform(loma, inputs.data(), targets.data(), B, T);
      if (!layout.ok()) return layout.status();
      inputs = std::move(layout->tokens);
      targets = std::move(layout->targets);
      seq_len = layout->seq_len;
    }
    // The last micro-batch also averages the gradients over dp (overlapped on the GPU).
    const bool last = micro + 1 == config_.grad_accum;
    // Backward adds to the gradients, so the NaN survives it and then the average over dp.
    if (last && inject_nan)
      backend_->SetGradient(
          model_->FindParam(absl::StrFormat("model.layers.%d.input_layernorm.weight",
                                            config_.faults.nan_layer))
              ->offset,
          std::numeric_limits<float>::quiet_NaN());
    const absl::StatusOr<model::ForwardResult> r = backend_->ForwardBackward(
        inputs.data(), targets.data(), B, seq_len, options, 1.0 / config_.grad_accum, last);
    if (!r.ok()) return r.status();
    loss += r->loss / config_.grad_accum;
    lm_loss += r->lm_loss / config_.grad_accum;
    cr_loss += r->cr_loss / config_.grad_accum;
    rep_loss += r->rep_loss / config_.grad_accum;
    distill += r->distill_loss / config_.grad_accum;
    merge += r->merge_fraction / config_.grad_accum;
  }

  // Data parallel: average the reported statistics over ranks (the gradients were, in Backward).
  if (dp_->size() > 1) {
    double stats[6] = {loss, lm_loss, cr_loss, rep_loss, merge, distill};
    if (absl::Status s = dp_->AllReduceSum(stats, 6); !s.ok()) return s;
    loss = stats[0] / dp_->size();
    lm_loss = stats[1] / dp_->size();
    cr_loss = stats[2] / dp_->size();
    rep_loss = stats[3] / dp_->size();
    merge = stats[4] / dp_->size();
    distill = stats[5] / dp_->size();
  }
  // Non-finite steps. The loss is averaged over dp above; over tp it is taken as bad when it is
  // on any rank. The gradient norm needs no vote: the gradients are averaged over dp and the norm
  // summed over tp, so a NaN on any rank reaches every rank's norm, and a backend skips the
  // update itself when its norm is not finite.
  double bad_loss = std::isfinite(loss) ? 0.0 : 1.0;
  if (tp_->size() > 1)
    if (absl::Status s = tp_->AllReduceMax(&bad_loss, 1); !s.ok()) return s;
  double grad_norm = std::numeric_limits<double>::quiet_NaN();
  if (bad_loss == 0) {
    absl::StatusOr<double> norm = backend_->OptimizerStep(sched.lr);
    if (!norm.ok()) return norm.status();
    grad_norm = *norm;
  }
  const bool skipped = !std::isfinite(grad_norm);
  bad_in_a_row_ = skipped ? bad_in_a_row_ + 1 : 0;
  bad_steps_ += skipped ? 1 : 0;
  if (bad_in_a_row_ >= config_.max_bad_steps)
    return absl::AbortedError(absl::StrFormat(
        "%d attempts in a row at step %d had a non-finite loss or gradient norm (loss %g, "
        "gradient norm %g): stopped without saving (--max_bad_steps=%d); the last checkpoint is "
        "the last good state: resume from it with a lower learning rate, or check the data",
        bad_in_a_row_, step_ + 1, loss, grad_norm, config_.max_bad_steps));

  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int64_t step_tokens = static_cast<int64_t>(B) * T * config_.grad_accum * dp_->size();
  if (!skipped) {
    ++step_;
    tokens_ += step_tokens;
  }

  StepMetrics m;
  m.step = skipped ? step_ + 1 : step_;
  m.skipped = skipped;
  m.bad_steps = bad_steps_;
  m.phase = loma.enabled() ? Phase::kLoma : sched.phase;
  m.loss = loss;
  m.lm_loss = lm_loss;
  m.cr_loss = cr_loss;
  m.rep_loss = rep_loss;
  m.distill_loss = distill;
  m.lr = sched.lr;
  m.grad_norm = grad_norm;
  // LoMA: a window of whole segments ends with 1/c of its tokens' slots, by construction.
  m.cr_target = loma.enabled() ? loma.zones.c : sched.cr_target;
  m.achieved_cr = loma.enabled() ? loma.zones.c : 1.0 / (1.0 - merge);
  m.tokens_per_second = step_tokens / seconds;
  const int ranks = dp_->size() * tp_->size();
  if (config_.peak_tflops > 0)
    m.mfu = m.tokens_per_second * FlopsPerToken() / (config_.peak_tflops * 1e12 * ranks);
  m.tokens = tokens_;
  return m;
}

absl::Status Trainer::Run(const std::function<absl::Status(const StepMetrics&)>& after_step) {
  const int total = config_.schedule.total_steps();
  const bool leader = dp_->rank() == 0 && tp_->rank() == 0;
  while (step_ < total) {
    absl::StatusOr<StepMetrics> m = Step();
    if (!m.ok()) return m.status();
    if (leader && (m->step % config_.log_every == 0 || m->step == total || m->step == 1 ||
                   m->skipped)) {
      std::printf("%s\n", FormatProgress(*m, total).c_str());
      std::fflush(stdout);
    }
    if (after_step)
      if (absl::Status s = after_step(*m); !s.ok()) return s;
  }
  return absl::OkStatus();
}

std::string FormatProgress(const StepMetrics& m, int total_steps) {
  const bool loma = m.phase == Phase::kLoma;
  std::string line = absl::StrFormat(
      "step %5d/%d | %-8s | loss %.4f (lm %.4f, %s %.4f) | lr %.2e | grad %.3f | ", m.step,
      total_steps, PhaseName(m.phase), m.loss, m.lm_loss, loma ? "rep" : "cr",
      loma ? m.rep_loss : m.cr_loss, m.lr, m.grad_norm);
  if (m.distill_loss > 0) line += absl::StrFormat("kl %.4f | ", m.distill_loss);
  line += loma ? absl::StrFormat("CR %.2f", m.achieved_cr)
               : absl::StrFormat("CR target %.2f achieved %.2f", m.cr_target, m.achieved_cr);
  line += absl::StrFormat(" | %.0f tok/s", m.tokens_per_second);
  if (m.mfu > 0) line += absl::StrFormat(" | MFU %.1f%%", 100 * m.mfu);
  if (m.skipped) line += " | SKIPPED: non-finite loss or gradient norm, weights unchanged";
  if (m.bad_steps > 0) line += absl::StrFormat(" | %d non-finite skipped", m.bad_steps);
  return line;
}

}  // namespace dmc::trainer
