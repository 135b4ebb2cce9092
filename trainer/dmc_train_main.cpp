// dmc-train: pre-train and/or retrofit a Llama with Dynamic Memory Compression, or retrofit it
// with LoMA memory-token compression (--method=loma).
//
//   dmc-train --data=shards/train_index.json --model=small --pretrain_steps=300 ...
//   dmc-train --method=loma --loma_t=2 --loma_c=4 --init_from=HF_DIR --pretrain_steps=200 ...
//   mpirun -np 4 dmc-train --tp=2 ...            (data parallel over 2, tensor parallel over 2;
//                                                 with --device=cuda, NCCL between GPUs)
//
// Every value is validated before any work starts; errors name the flag or file at fault.
#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "data/index.h"
#include "data/loader.h"
#include "model/config.h"
#include "model/hf_config.h"
#include "model/hf_weights.h"
#include "model/llama.h"
#include "model/loma.h"
#include "parallel/mpi_env.h"
#include "parallel/process_groups.h"
#include "trainer/checkpoint.h"
#include "trainer/metrics_log.h"
#include "trainer/trainer.h"
#if defined(DMC_HAVE_CUDA)
#include <cuda_runtime_api.h>

#include "trainer/cuda_backend.h"
#endif
#if defined(DMC_HAVE_NCCL)
#include "parallel/nccl_communicator.h"
#endif

ABSL_FLAG(std::string, method, "dmc",
          "dmc (pre-training and the DMC stages), dms (Dynamic Memory Sparsification: stages 2-3 "
          "retrofit --init_from with learned delayed eviction, distilled from it) or loma (LoMA "
          "retrofitting on the pre-training schedule; needs --loma_t and --loma_c)");
ABSL_FLAG(std::string, dms_variant, "adapter",
          "DMS decision logit: adapter (a zero-initialised Linear(RMSNorm(residual)) per layer, "
          "the base frozen: the released code) or query_channel (channel d-1 of each group's "
          "first query head, every weight trained: the paper)");
ABSL_FLAG(int, dms_window, 512, "DMS: a token marked for eviction stays for this many queries");
ABSL_FLAG(float, dms_scale, 100.0f, "DMS: decision logit a = scale · x - offset");
ABSL_FLAG(float, dms_offset, 5.0f, "DMS: decision logit offset");
ABSL_FLAG(float, dms_temperature, 0.1f, "DMS: Gumbel-sigmoid temperature");
ABSL_FLAG(int, loma_t, 0, "LoMA: memory slots per segment (--method=loma)");
ABSL_FLAG(int, loma_c, 0, "LoMA: compression ratio; a segment is loma_t × loma_c tokens");
ABSL_FLAG(std::string, model, "small", "model preset (tiny, small, small-d64, medium) when not importing weights; its vocabulary is the one --data records");
ABSL_FLAG(std::string, init_from, "",
          "Hugging Face checkpoint directory (config.json + safetensors) to start from");
ABSL_FLAG(std::string, checkpoint_dir, "", "directory of training checkpoints (resume state)");
ABSL_FLAG(int, checkpoint_every, 0, "steps between checkpoints (0: only at the end and on SIGTERM)");
ABSL_FLAG(int, keep_last, 3, "checkpoints kept in --checkpoint_dir");
ABSL_FLAG(bool, resume, false, "continue from --checkpoint_dir/latest");
ABSL_FLAG(std::string, data, "", "training shard index (train_index.json written by dmc-prep)");
ABSL_FLAG(std::string, device, "cpu",
          "cpu, or cuda (a GPU per rank, or ranks sharing GPUs over MPI; head dim 64 or 128)");
ABSL_FLAG(int, tp, 1, "tensor-parallel size (divides the number of MPI ranks and KV heads)");
ABSL_FLAG(int, seq_len, 256, "tokens per sequence");
ABSL_FLAG(int, micro_batch, 8, "sequences per micro-batch per data-parallel rank");
ABSL_FLAG(int, global_batch, 0,
          "sequences per optimizer step over all ranks; 0 = micro_batch × data-parallel size "
          "(otherwise it sets the gradient accumulation)");
ABSL_FLAG(int, pretrain_steps, 0, "steps of plain pre-training (DMC off)");
ABSL_FLAG(int, stage1_steps, 0, "DMC stage 1: steps fading out the control channel");
ABSL_FLAG(int, stage2_steps, 0, "DMC stage 2: steps ramping the CR target from 1 to --cr_target");
ABSL_FLAG(int, stage3_steps, 0, "DMC stage 3: steps at the final CR target");
ABSL_FLAG(float, cr_target, 1.0f, "final compression-ratio target (>= 1)");
ABSL_FLAG(float, lr, 3e-4f, "pre-training peak learning rate");
ABSL_FLAG(float, min_lr, 3e-5f, "pre-training final learning rate (cosine)");
ABSL_FLAG(int, warmup_steps, 0, "pre-training warmup steps");
ABSL_FLAG(float, retrofit_lr, 3e-5f, "learning rate of DMC stages 1-2 (and start of stage 3)");
ABSL_FLAG(float, retrofit_min_lr, 3e-6f, "final learning rate of DMC stage 3 (cosine)");
ABSL_FLAG(float, weight_decay, 0.1f, "AdamW decoupled weight decay (matrices only)");
ABSL_FLAG(float, grad_clip, 1.0f, "max global gradient norm (<= 0: off)");
ABSL_FLAG(bool, zero1, false,
          "ZeRO-1: shard the AdamW moments over the data-parallel ranks (each keeps and updates "
          "1/dp of every TP shard's parameters, then the weights are all-gathered): moments "
          "memory / dp, bit-identical results; no effect at dp 1; checkpoints as without it, so "
          "a run may resume with it toggled or at another dp size");
ABSL_FLAG(int, dmc_window, 12, "DMC partial-accumulation window");
ABSL_FLAG(float, dmc_temperature, 0.1f, "DMC Gumbel-sigmoid temperature");
ABSL_FLAG(float, dmc_init_val, 5.0f, "DMC decision offset");
ABSL_FLAG(uint64_t, seed, 1234, "seed of weights, data order and DMC noise");
ABSL_FLAG(int, max_bad_steps, 10,
          "attempts in a row with a non-finite loss or gradient norm (each skipped on every rank, "
          "its batch consumed) after which the run stops with an error, saving nothing");
ABSL_FLAG(int, log_every, 10, "steps between progress lines");
ABSL_FLAG(std::string, log_jsonl, "", "append per-step metrics as JSON lines to this file");
ABSL_FLAG(double, peak_tflops, 0, "peak TFLOP/s per rank for the MFU column (0: not shown)");

namespace {

using dmc::model::LlamaConfig;

// SIGTERM/SIGINT ask for a checkpoint and a clean exit after the current step.
std::atomic<int> g_stop_signal{0};
extern "C" void OnStopSignal(int signal) { g_stop_signal = signal; }

// Everything that is decided before the first step. Returns an error naming the bad input.
// Every rank must run the same job: each dmc-train flag is compared across the ranks before any
// work, so a launcher that hands one rank other flags stops with an error naming the flag and
// the ranks on every rank, instead of a hang or a silently different run.
absl::Status CheckFlagsSameOnAllRanks(dmc::parallel::Communicator& world) {
  std::vector<std::pair<std::string, std::string>> flags;
  for (const auto& [name, flag] : absl::GetAllFlags())
    if (absl::StrContains(flag->Filename(), "dmc_train_main"))
      flags.emplace_back(std::string(name), flag->CurrentValue());
  std::sort(flags.begin(), flags.end());  // the same order on every rank
  for (const auto& [name, value] : flags)
    if (absl::Status s = dmc::parallel::CheckSameOnAllRanks(world, "--" + name, value); !s.ok())
      return s;
  return absl::OkStatus();
}

absl::Status Run(dmc::parallel::ProcessGroups& groups) {
  const bool leader = groups.world().rank() == 0;
  if (absl::Status s = CheckFlagsSameOnAllRanks(groups.world()); !s.ok()) return s;
  const std::string device = absl::GetFlag(FLAGS_device);
  if (device != "cpu" && device != "cuda")
    return absl::InvalidArgumentError("--device=" + device + ": expected cpu or cuda");
  const std::string method = absl::GetFlag(FLAGS_method);
  const int loma_t = absl::GetFlag(FLAGS_loma_t), loma_c = absl::GetFlag(FLAGS_loma_c);
  if (method != "dmc" && method != "dms" && method != "loma")
    return absl::InvalidArgumentError("--method=" + method + ": expected dmc, dms or loma");
  const bool loma = method == "loma", dms = method == "dms";
  const std::string dms_variant = absl::GetFlag(FLAGS_dms_variant);
  if (dms_variant != "adapter" && dms_variant != "query_channel")
    return absl::InvalidArgumentError("--dms_variant=" + dms_variant +
                                      ": expected adapter or query_channel");
  if (dms && (absl::GetFlag(FLAGS_init_from).empty() || absl::GetFlag(FLAGS_pretrain_steps) != 0))
    return absl::InvalidArgumentError(
        "--method=dms retrofits a pre-trained model: it needs --init_from (the teacher) and "
        "--pretrain_steps=0");
  if (dms && dms_variant == "adapter" && absl::GetFlag(FLAGS_stage1_steps) != 0)
    return absl::InvalidArgumentError(
        "--stage1_steps must be 0 with --dms_variant=adapter (it has no control channel to free)");
  if (loma && (loma_t < 1 || loma_c < 1))
    return absl::InvalidArgumentError(absl::StrFormat(
        "--method=loma needs --loma_t >= 1 and --loma_c >= 1, got --loma_t=%d --loma_c=%d",
        loma_t, loma_c));
  if (!loma && (loma_t != 0 || loma_c != 0))
    return absl::InvalidArgumentError("--loma_t and --loma_c apply only with --method=loma");
#if !defined(DMC_HAVE_CUDA)
  if (device == "cuda")
    return absl::FailedPreconditionError(
        "--device=cuda: this dmc-train was built without the CUDA backend (configure with "
        "-DDMC_CUDA=ON on a machine with nvcc)");
#endif
  LlamaConfig model_config;
  const std::string init_from = absl::GetFlag(FLAGS_init_from);
  if (!init_from.empty()) {
    absl::StatusOr<LlamaConfig> hf = dmc::model::ReadHfConfig(init_from + "/config.json");
    if (!hf.ok()) return hf.status();
    model_config = *hf;
    if (model_config.loma.enabled())
      return absl::InvalidArgumentError(absl::StrFormat(
          "--init_from=%s is already a LoMA model (t %d, c %d): dmc-train retrofits models "
          "without LoMA (continue a LoMA run with --resume)",
          init_from, model_config.loma.zones.t, model_config.loma.zones.c));
  } else {
    if (absl::Status s = dmc::model::PresetConfig(absl::GetFlag(FLAGS_model), &model_config);
        !s.ok())
      return s;
    // A preset gives the shape; the vocabulary and the BOS/EOS ids are the tokenizer's, as the
    // shards record them (a missing --data is reported below, after the flag checks).
    if (!absl::GetFlag(FLAGS_data).empty()) {
      absl::StatusOr<dmc::data::ShardIndex> index = dmc::data::ReadIndex(absl::GetFlag(FLAGS_data));
      if (!index.ok()) return index.status();
      model_config.vocab_size = static_cast<int>(index->vocab_size);
      if (index->bos_id >= 0) model_config.bos_token_id = static_cast<int>(index->bos_id);
      if (index->eos_id >= 0) model_config.eos_token_id = static_cast<int>(index->eos_id);
    }
  }
  model_config.dmc.window = absl::GetFlag(FLAGS_dmc_window);
  model_config.dmc.temperature = absl::GetFlag(FLAGS_dmc_temperature);
  model_config.dmc.init_val = absl::GetFlag(FLAGS_dmc_init_val);
  // The teacher (model/DMS.md §4) is the model the retrofit starts from, before DMS is added.
  const LlamaConfig teacher_config = model_config;
  if (dms) {
    if (model_config.dms.is_dms() || model_config.dmc.enabled)
      return absl::InvalidArgumentError(absl::StrFormat(
          "--init_from=%s is already a %s model: --method=dms retrofits a model without "
          "compression (continue a DMS run with --resume)",
          init_from, model_config.dms.is_dms() ? "DMS" : "DMC"));
    model_config.dms.variant = dms_variant == "adapter" ? dmc::model::DmsVariant::kAdapter
                                                        : dmc::model::DmsVariant::kQueryChannel;
    model_config.dms.window = absl::GetFlag(FLAGS_dms_window);
    model_config.dms.scale = absl::GetFlag(FLAGS_dms_scale);
    model_config.dms.offset = absl::GetFlag(FLAGS_dms_offset);
    model_config.dms.temperature = absl::GetFlag(FLAGS_dms_temperature);
  }
  if (absl::Status s = model_config.Validate(); !s.ok()) return s;

  const auto& layout = groups.layout();
  dmc::trainer::TrainConfig tc;
  tc.seq_len = absl::GetFlag(FLAGS_seq_len);
  tc.micro_batch = absl::GetFlag(FLAGS_micro_batch);
  const int global_batch = absl::GetFlag(FLAGS_global_batch);
  if (global_batch > 0) {
    const int per_step = tc.micro_batch * layout.dp_size;
    if (global_batch % per_step != 0)
      return absl::InvalidArgumentError(absl::StrFormat(
          "--global_batch %d is not a multiple of --micro_batch × data-parallel size = %d",
          global_batch, per_step));
    tc.grad_accum = global_batch / per_step;
  }
  tc.seed = absl::GetFlag(FLAGS_seed);
  tc.log_every = absl::GetFlag(FLAGS_log_every);
  tc.peak_tflops = absl::GetFlag(FLAGS_peak_tflops);
  dmc::trainer::ScheduleConfig& s = tc.schedule;
  s.pretrain_steps = absl::GetFlag(FLAGS_pretrain_steps);
  s.stage1_steps = absl::GetFlag(FLAGS_stage1_steps);
  s.stage2_steps = absl::GetFlag(FLAGS_stage2_steps);
  s.stage3_steps = absl::GetFlag(FLAGS_stage3_steps);
  s.cr_target = absl::GetFlag(FLAGS_cr_target);
  s.lr = absl::GetFlag(FLAGS_lr);
  s.min_lr = absl::GetFlag(FLAGS_min_lr);
  s.warmup_steps = absl::GetFlag(FLAGS_warmup_steps);
  s.retrofit_lr = absl::GetFlag(FLAGS_retrofit_lr);
  s.retrofit_min_lr = absl::GetFlag(FLAGS_retrofit_min_lr);
  if (loma) {
    // <m> and <r> follow the data's vocabulary, which is model_config's before the growth.
    absl::StatusOr<dmc::model::LomaLayout> layout =
        dmc::model::MakeLomaLayout(model_config.vocab_size, loma_t, loma_c);
    if (!layout.ok()) return layout.status();
    tc.loma = *layout;
  }
  tc.optimizer.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  tc.optimizer.grad_clip = absl::GetFlag(FLAGS_grad_clip);
  tc.optimizer.zero1 = absl::GetFlag(FLAGS_zero1);
  tc.max_bad_steps = absl::GetFlag(FLAGS_max_bad_steps);
  absl::StatusOr<dmc::trainer::FaultPlan> faults = dmc::trainer::FaultPlan::FromEnv();
  if (!faults.ok()) return faults.status();
  tc.faults = *faults;
  if (absl::Status st = tc.Validate(model_config); !st.ok()) return st;
  if (model_config.num_key_value_heads % layout.tp_size != 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "--tp %d must divide the model's num_key_value_heads (%d) and intermediate_size (%d)",
        layout.tp_size, model_config.num_key_value_heads, model_config.intermediate_size));
  if (absl::GetFlag(FLAGS_data).empty())
    return absl::InvalidArgumentError("--data is required: a train_index.json written by dmc-prep");
  const std::string checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  if (absl::GetFlag(FLAGS_resume) && checkpoint_dir.empty())
    return absl::InvalidArgumentError("--resume needs --checkpoint_dir");

  dmc::data::LoaderOptions lo;
  lo.index_path = absl::GetFlag(FLAGS_data);
  lo.seq_len = tc.seq_len;
  lo.batch_size = tc.micro_batch;
  lo.dp_rank = layout.dp_rank;
  lo.dp_size = layout.dp_size;
  lo.seed = tc.seed;
  lo.expected_vocab_size = model_config.vocab_size;
  absl::StatusOr<std::unique_ptr<dmc::data::ShardLoader>> loader = dmc::data::ShardLoader::Open(lo);
  if (!loader.ok()) return loader.status();

  // The host model, the trainer's statistics and the checkpoints work on host buffers: the host
  // groups. Only a device backend's collectives may go to NCCL (groups.tp() / groups.dp()).
  auto model_ptr = std::make_unique<dmc::model::Llama<float>>(model_config, &groups.host_tp());
  if (init_from.empty()) {
    model_ptr->InitRandom(tc.seed);
  } else if (absl::Status st = dmc::model::ImportHfWeights(init_from, model_ptr.get()); !st.ok()) {
    return st;
  }
  // LoMA: grow the vocabulary by <m> and <r> (before a resume loads the grown checkpoint).
  if (loma) model_ptr = dmc::model::AddLomaTokens(*model_ptr, &groups.host_tp(), tc.loma.zones);
  dmc::model::Llama<float>& model = *model_ptr;
  // DMS query-channel variant: a frozen copy of the original model is the teacher; the adapter
  // variant's teacher is the model itself with eviction off (its base is frozen).
  std::unique_ptr<dmc::model::Llama<float>> teacher;
  std::string teacher_hash;
  if (dms && model_config.dms.variant == dmc::model::DmsVariant::kQueryChannel) {
    teacher = std::make_unique<dmc::model::Llama<float>>(teacher_config, &groups.host_tp());
    if (absl::Status st = dmc::model::ImportHfWeights(init_from, teacher.get()); !st.ok())
      return st;
    teacher_hash = dmc::trainer::WeightsHash(teacher->params());
  }
  std::unique_ptr<dmc::trainer::TrainBackend> backend;  // null: the CPU
#if defined(DMC_HAVE_CUDA)
  if (device == "cuda") {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
      return absl::FailedPreconditionError("--device=cuda: no usable CUDA device");
    // One GPU per rank, ranks of a node on consecutive devices; more ranks than GPUs share them.
    if (cudaError_t e = cudaSetDevice(groups.world().rank() % devices); e != cudaSuccess)
      return absl::InternalError(std::string("cudaSetDevice: ") + cudaGetErrorString(e));
    // TP and DP collectives on NCCL where every rank of the group has a GPU of its own; a group
    // whose ranks share one (more ranks than GPUs) stays on MPI through host memory.
#if defined(DMC_HAVE_NCCL)
    absl::StatusOr<dmc::parallel::NcclGroups> nccl = dmc::parallel::UseNccl(groups);
    if (!nccl.ok()) return nccl.status();
    const bool nccl_tp = nccl->tp, nccl_dp = nccl->dp;
    const char* why = "its ranks share a GPU, which NCCL refuses";
#else
    const bool nccl_tp = false, nccl_dp = false;
    const char* why = "this dmc-train was built without NCCL";
#endif
    for (const auto& [group, on_nccl] : {std::pair(&groups.host_tp(), nccl_tp),
                                         std::pair(&groups.host_dp(), nccl_dp)})
      if (leader && group->size() > 1 && !on_nccl)
        std::printf("dmc-train: group %s communicates through host memory over MPI (%s): slower, "
                    "same results\n",
                    group->name().c_str(), why);
    absl::StatusOr<std::unique_ptr<dmc::trainer::CudaBackend>> cuda =
        dmc::trainer::CudaBackend::Create(model, tc.optimizer, &groups.tp(), &groups.dp());
    if (!cuda.ok()) return cuda.status();
    backend = std::move(*cuda);
  }
#endif
  if (leader)
    std::printf("dmc-train: %s model, %.2fM parameters, %d ranks (dp %d × tp %d), %d steps, "
                "%d tokens per step%s%s%s\n",
                absl::GetFlag(FLAGS_init_from).empty()
                    ? absl::GetFlag(FLAGS_model).c_str()
                    : absl::GetFlag(FLAGS_init_from).c_str(),
                model.config().num_parameters() / 1e6,
                layout.world_size, layout.dp_size, layout.tp_size, s.total_steps(),
                tc.seq_len * tc.micro_batch * tc.grad_accum * layout.dp_size,
                backend ? ", on CUDA" : "",
                tc.optimizer.zero1 && layout.dp_size > 1 ? ", ZeRO-1 (AdamW moments over dp)" : "",
                loma ? absl::StrFormat(", LoMA t %d c %d (<m> %d, <r> %d)", loma_t, loma_c,
                                       tc.loma.memory_token, tc.loma.repetition_token)
                           .c_str()
                     : "");

  dmc::data::ShardLoader* source = loader->get();
  dmc::trainer::Trainer trainer(
      tc, &model,
      [source](std::vector<int32_t>* in, std::vector<int32_t>* tgt) { return source->Next(in, tgt); },
      &groups.host_dp(), &groups.host_tp(), std::move(backend));
  if (teacher)
    if (absl::Status st = trainer.backend().SetTeacher(teacher.get()); !st.ok()) return st;
  dmc::trainer::Checkpointer checkpointer(checkpoint_dir, absl::GetFlag(FLAGS_keep_last),
                                          &groups.world(), layout.tp_rank, layout.tp_size,
                                          layout.dp_rank);
  checkpointer.set_faults(tc.faults);
  // The step of the newest checkpoint that holds this run's state: the end saves unless it is.
  int saved_step = -1;
  if (absl::GetFlag(FLAGS_resume)) {
    absl::StatusOr<dmc::trainer::TrainingState> state =
        checkpointer.LoadLatest(model, trainer.optimizer());
    if (!state.ok()) return state.status();
    // The teacher is not in the checkpoint: --init_from must still hold the same weights. Rank
    // 0's shard is what was recorded; every rank learns its verdict.
    double changed = leader && state->teacher != teacher_hash ? 1.0 : 0.0;
    if (absl::Status st = groups.world().AllReduceMax(&changed, 1); !st.ok()) return st;
    if (changed > 0)
      return absl::FailedPreconditionError(absl::StrFormat(
          "--init_from=%s: the teacher's weights differ from those the checkpoint in %s was "
          "trained against (hash %s, recorded %s)",
          init_from, checkpoint_dir, teacher_hash, leader ? state->teacher : "on rank 0"));
    // A device backend trains its own copy: hand it the loaded weights and moments.
    if (absl::Status st = trainer.SyncFromHost(); !st.ok()) return st;
    absl::StatusOr<dmc::data::LoaderCursor> cursor =
        dmc::data::LoaderCursor::FromString(state->loader_cursor);
    if (!cursor.ok()) return cursor.status();
    if (absl::Status st = source->Restore(*cursor); !st.ok()) return st;
    trainer.set_step(state->step);
    trainer.set_tokens(state->tokens);
    saved_step = state->step;
    if (leader) std::printf("dmc-train: resumed at step %d from %s\n", state->step, checkpoint_dir.c_str());
  }
  auto save = [&]() -> absl::Status {
    if (checkpoint_dir.empty()) return absl::OkStatus();
    // A device backend's weights and moments → the host model and optimizer the checkpoint reads.
    if (absl::Status st = trainer.SyncToHost(); !st.ok()) return st;
    dmc::trainer::TrainingState state{trainer.step(), trainer.tokens(), trainer.optimizer().step(),
                                      source->cursor().ToString(), tc.seed, teacher_hash};
    absl::Status st = checkpointer.Save(model, trainer.optimizer(), state);
    if (st.ok()) saved_step = trainer.step();
    if (st.ok() && leader)
      std::printf("dmc-train: checkpoint %s/%s\n", checkpoint_dir.c_str(),
                  dmc::trainer::Checkpointer::StepDirName(trainer.step()).c_str());
    return st;
  };
  std::signal(SIGTERM, OnStopSignal);
  std::signal(SIGINT, OnStopSignal);
  std::unique_ptr<dmc::trainer::MetricsLog> log;
  if (leader && !absl::GetFlag(FLAGS_log_jsonl).empty()) {
    auto opened = dmc::trainer::MetricsLog::Open(absl::GetFlag(FLAGS_log_jsonl));
    if (!opened.ok()) return opened.status();
    log = std::move(*opened);
  }
  // A failed interval save (a full disk, a write error) is reported and the run goes on: the next
  // interval tries again, and the checkpoints already saved stay as they were. The last save (at
  // the end, or on a stop signal) must succeed, or the run fails with its error.
  const int every = absl::GetFlag(FLAGS_checkpoint_every);
  absl::Status run = trainer.Run([&](const dmc::trainer::StepMetrics& m) -> absl::Status {
    if (log)
      if (absl::Status st = log->Write(m); !st.ok()) return st;
    if (tc.faults.stop_after == m.step && !m.skipped) std::raise(SIGTERM);
    // Every rank must agree to stop at the same step: take the max of the signal flags.
    double stop = g_stop_signal.load() != 0 ? 1.0 : 0.0;
    if (absl::Status st = groups.world().AllReduceMax(&stop, 1); !st.ok()) return st;
    if (stop > 0) {
      if (absl::Status st = save(); !st.ok()) return st;
      return absl::CancelledError(absl::StrFormat("stopped by a signal after step %d", trainer.step()));
    }
    if (every > 0 && m.step % every == 0 && !m.skipped)
      if (absl::Status st = save(); !st.ok() && leader)
        std::fprintf(stderr, "dmc-train: WARNING: %s; training goes on, the next save is at step %d\n",
                     std::string(st.message()).c_str(), std::min(m.step + every, s.total_steps()));
    return absl::OkStatus();
  });
  if (absl::IsCancelled(run)) {
    if (leader) std::printf("dmc-train: %s; resume with --resume\n", std::string(run.message()).c_str());
    return absl::OkStatus();
  }
  if (!run.ok()) return run;
  if (saved_step != trainer.step()) return save();
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Pre-train and retrofit Llama models with Dynamic Memory Compression or LoMA");
  absl::ParseCommandLine(argc, argv);
  dmc::parallel::MpiEnv mpi(&argc, &argv);
  absl::StatusOr<dmc::parallel::ProcessGroups> groups =
      dmc::parallel::ProcessGroups::Create(MPI_COMM_WORLD, absl::GetFlag(FLAGS_tp));
  if (!groups.ok()) {
    std::fprintf(stderr, "dmc-train: %s\n", groups.status().ToString().c_str());
    return 2;
  }
  const absl::Status status = Run(*groups);
  if (!status.ok()) {
    std::fprintf(stderr, "dmc-train (rank %d): %s\n", groups->world().rank(),
                 status.ToString().c_str());
    return 1;
  }
  return 0;
}
