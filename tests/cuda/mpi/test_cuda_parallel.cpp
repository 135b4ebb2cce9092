// Tensor and data parallelism of the CUDA model (model/llama_cuda.h, model/llama_cuda_parallel.h)
// against the single-process CPU model (model/llama.h, the specification), under mpirun:
//   mpirun -np 2: TP 2 (and, with --tp 1, DP 2); mpirun -np 4: DP 2 × TP 2 (and DP 4).
// The CudaZero1 cases check the ZeRO-1 optimizer step (moments sharded over DP) against the
// unsharded one.
// Every rank also runs the CPU model on the whole global batch by itself. One training step of two
// micro-batches (gradient accumulation: only the last one averages over DP) must give the same
// losses, merge statistics and, gathered over TP, every gradient tensor, within the bf16 bounds of
// tests/cuda/test_cuda_model.cpp, from gradients that held NaN before ZeroGrad; the bucketed DP
// reduction overlapped with the backward pass (Backward(loss_scale, dp)) must agree with the
// plain one after it (AverageGradients).
//
// The Mpi cases put every rank on one GPU (rank % GPUs: all on device 0 of a one-GPU machine) with
// MPI communicators, which the model stages through host memory; the Nccl cases need one GPU per
// rank and NCCL. Without a GPU every test skips, on every rank alike.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_ops.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "parallel/process_groups.h"
#include "tests/cuda/model_test_util.h"
#include "tests/mpi/mpi_test_util.h"
#if defined(DMC_HAVE_NCCL)
#include "parallel/nccl_communicator.h"
#endif

namespace dmc::cuda_test {
namespace {

using kernels::DmcDecisionMode;
using model::ParamSpec;
using parallel::Communicator;

enum class Comms { kMpi, kNccl };

struct Case {
  const char* name;
  bool dmc;
  DmcDecisionMode mode;
  int hidden, heads, kv_heads;
  bool tied;  // tied embeddings: the embedding's gradient is complete only at the very end
};

// The bucketed and the plain DP reduction sum the same gradients, but from two backward passes,
// and the attention backward accumulates dq with fp32 atomics, whose order varies from run to
// run: a dq element may round to the neighbouring bf16 value. That moves a gradient by ~1e-5.
constexpr double kSameTol = 1e-3;

model::LlamaConfig MakeConfig(const Case& c) {
  model::LlamaConfig m = SmallModelConfig(c.dmc, c.hidden, c.heads, c.kv_heads);
  m.tie_word_embeddings = c.tied;
  return m;
}

// Global micro-batch m: G sequences of T tokens; one unlabelled position per sequence, so every DP
// rank's slice holds as many labels and the mean of the ranks' mean losses is the global mean.
void MakeBatch(int G, int T, int V, int m, std::vector<int32_t>* in, std::vector<int32_t>* tgt) {
  std::mt19937_64 rng(1000 + m);
  in->resize(static_cast<size_t>(G) * T);
  tgt->resize(in->size());
  for (size_t i = 0; i < in->size(); ++i) {
    (*in)[i] = static_cast<int32_t>(rng() % V);
    (*tgt)[i] = static_cast<int32_t>(rng() % V);
  }
  for (int b = 0; b < G; ++b) (*tgt)[static_cast<size_t>(b) * T + (3 + 5 * b) % T] = -1;
}

// Element (i, j) of TP rank r's shard of a tensor, in the full tensor (split as llama.cpp does).
// The tests' shapes split evenly (vocabulary 64, TP 2), so every rank's shard has this rank's
// shape and offset.
size_t FullIndex(const ParamSpec& s, int r, int ranks, int64_t i, int64_t j) {
  const int64_t full_cols = s.full_shape.size() > 1 ? s.full_shape[1] : 1;
  const int64_t begin =
      s.split_dim >= 0 ? model::TpShard(s.full_shape[s.split_dim], r, ranks).begin : 0;
  const int64_t row0 = s.split_dim == 0 ? begin : 0;
  const int64_t col0 = s.split_dim == 1 ? begin : 0;
  return static_cast<size_t>((row0 + i) * full_cols + col0 + j);
}

// TP rank r's shard (layout `specs`) of the full model's flat vector `full`.
std::vector<float> ShardOf(const model::Llama<float>& model, const std::vector<float>& full,
                           const std::vector<ParamSpec>& specs, int r, int ranks) {
  size_t n = 0;
  for (const ParamSpec& s : specs) n = std::max(n, s.offset + s.size);
  std::vector<float> shard(n);
  for (const ParamSpec& s : specs) {
    const size_t base = model.FindParam(s.name)->offset;
    const int64_t rows = s.shape[0], cols = s.shape.size() > 1 ? s.shape[1] : 1;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        shard[s.offset + i * cols + j] = full[base + FullIndex(s, r, ranks, i, j)];
  }
  return shard;
}

// The full-layout vector from every TP rank's shard (collective over the host TP group). Also
// returns, in *replica_diff, the largest relative difference of a replicated tensor between the
// TP ranks: they must hold the same values, or the replicas' weights would drift apart.
std::vector<float> Unshard(Communicator& host_tp, const std::vector<float>& local,
                           const model::Llama<float>& model, const std::vector<ParamSpec>& specs,
                           double* replica_diff) {
  std::vector<float> all(local.size() * host_tp.size());
  const absl::Status st = host_tp.AllGather(local.data(), all.data(), local.size());
  EXPECT_TRUE(st.ok()) << st;
  std::vector<float> full(model.params().size());
  *replica_diff = 0;
  for (const ParamSpec& s : specs) {
    const size_t base = model.FindParam(s.name)->offset;
    const int64_t rows = s.shape[0], cols = s.shape.size() > 1 ? s.shape[1] : 1;
    for (int r = 0; r < host_tp.size(); ++r) {
      const float* shard = all.data() + r * local.size() + s.offset;
      if (s.split_dim < 0 && r > 0) {
        *replica_diff = std::max(*replica_diff, RelError(shard, full.data() + base, s.size));
        continue;
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
          full[base + FullIndex(s, r, host_tp.size(), i, j)] = shard[i * cols + j];
    }
  }
  return full;
}

double SumOver(Communicator& comm, double x) {
  const absl::Status st = comm.AllReduceSum(&x, 1);
  EXPECT_TRUE(st.ok()) << st;
  return x;
}

// The process groups of a case: this rank's GPU selected (rank % GPUs: all on device 0 of a
// one-GPU machine), TP and DP on NCCL for kNccl. Where the machine cannot run the case, leaves
// *groups empty and says why in *skip (the same decision on every rank).
void MakeGpuGroups(parallel::MpiCommunicator& world, int tp_size, Comms comms,
                   std::optional<parallel::ProcessGroups>* groups, std::string* skip) {
  int gpus = 0;
  const bool gpu = cudaGetDeviceCount(&gpus) == cudaSuccess && gpus > 0 &&
                   cudaSetDevice(testing::WorldRank() % gpus) == cudaSuccess;
  if (!testing::OnAllRanks(world, gpu)) {
    *skip = "needs a CUDA device";
    return;
  }
  if (world.size() % tp_size != 0) {
    *skip = "tp " + std::to_string(tp_size) + " does not divide " + std::to_string(world.size());
    return;
  }
  absl::StatusOr<parallel::ProcessGroups> made =
      parallel::ProcessGroups::Create(world.comm(), tp_size, testing::kTestTimeoutSeconds);
  ASSERT_TRUE(made.ok()) << made.status();
  if (comms == Comms::kNccl) {
#if defined(DMC_HAVE_NCCL)
    if (!testing::OnAllRanks(world, gpus >= world.size())) {
      *skip = "needs one GPU per rank";
      return;
    }
    absl::StatusOr<parallel::NcclGroups> nccl = parallel::UseNccl(*made, testing::kTestTimeoutSeconds);
    ASSERT_TRUE(nccl.ok()) << nccl.status();
    ASSERT_EQ(nccl->tp, tp_size > 1) << "one GPU per rank, yet the TP group stayed on MPI";
    ASSERT_EQ(nccl->dp, made->layout().dp_size > 1) << "one GPU per rank, yet DP stayed on MPI";
#else
    *skip = "built without NCCL";
    return;
#endif
  }
  groups->emplace(std::move(*made));
}

// One step of two micro-batches on the CPU model (global batches) and on two CUDA models (this
// rank's slices): `bucketed` averages over DP inside the last Backward, `plain` after it.
void ExpectStepMatchesCpu(const Case& tc, int tp_size, Comms comms) {
  auto world = testing::TestWorld();
  ASSERT_NE(world, nullptr);
  std::optional<parallel::ProcessGroups> groups;
  std::string skip;
  MakeGpuGroups(*world, tp_size, comms, &groups, &skip);
  if (!skip.empty()) GTEST_SKIP() << skip;
  ASSERT_TRUE(groups.has_value());
  const parallel::ParallelLayout& layout = groups->layout();
  Communicator& host_tp = groups->host_tp();
  Communicator& host_dp = groups->host_dp();
  const model::LlamaConfig config = MakeConfig(tc);
  const int B = 2, G = B * layout.dp_size, T = 33, L = config.num_hidden_layers;
  const int Hkv = config.num_key_value_heads, Hkv_local = Hkv / tp_size;
  const char* comm_name = comms == Comms::kNccl ? "nccl" : "mpi";

  model::Llama<float> cpu(config, nullptr);
  ShapeWeights(&cpu, 7);
  model::LlamaCuda bucketed(config, &groups->tp());
  model::LlamaCuda plain(config, &groups->tp());
  const std::vector<ParamSpec>& specs = bucketed.param_specs();
  const std::vector<float> shard = ShardOf(cpu, cpu.params(), specs, layout.tp_rank, tp_size);
  bucketed.CopyParamsFromHost(shard);
  plain.CopyParamsFromHost(shard);
  // A bucket per layer (and one for the head, one for the embedding): every boundary is exercised.
  bucketed.set_dp_bucket_floats(1);

  model::StepOptions opt;
  opt.mode = tc.mode;
  opt.noise_seed = 1234;
  opt.step = 3;
  opt.cr_prior = tc.dmc ? 0.75f : 0.0f;  // above the merge fractions: the hinge is active
  // NaN before ZeroGrad: the first micro-batch's Backward must write every gradient of this
  // rank's shard (or zero it) without reading it (model/llama_cuda.h ZeroGrad).
  const std::vector<float> nan(bucketed.num_params(), std::nanf(""));
  bucketed.GradsFromHost(nan);
  plain.GradsFromHost(nan);
  cpu.ZeroGrad();
  bucketed.ZeroGrad();
  plain.ZeroGrad();
  for (int m = 0; m < 2; ++m) {
    std::vector<int32_t> in, tgt;
    MakeBatch(G, T, config.vocab_size, m, &in, &tgt);
    const size_t first = static_cast<size_t>(layout.dp_rank) * B * T;
    const std::vector<int32_t> my_in(in.begin() + first, in.begin() + first + B * T);
    const std::vector<int32_t> my_tgt(tgt.begin() + first, tgt.begin() + first + B * T);
    opt.seq0 = static_cast<long>(m) * G;  // the trainer's numbering: same noise in every layout
    const model::ForwardResult rc = cpu.Forward(in.data(), tgt.data(), G, T, opt);
    opt.seq0 += static_cast<long>(layout.dp_rank) * B;
    const model::ForwardResult rg = bucketed.Forward(my_in.data(), my_tgt.data(), B, T, opt);
    plain.Forward(my_in.data(), my_tgt.data(), B, T, opt);

    // Decision flips against the CPU model: this rank's heads of this rank's sequences.
    int flips = 0;
    if (tc.dmc)
      for (int l = 0; l < L; ++l) {
        const std::vector<float> mg = bucketed.MergeToHost(l);
        ASSERT_EQ(mg.size(), static_cast<size_t>(B) * T * Hkv_local);
        for (int b = 0; b < B; ++b)
          for (int t = 0; t < T; ++t)
            for (int j = 0; j < Hkv_local; ++j) {
              const size_t global = ((static_cast<size_t>(layout.dp_rank) * B + b) * T + t) * Hkv +
                                    layout.tp_rank * Hkv_local + j;
              flips += mg[(static_cast<size_t>(b) * T + t) * Hkv_local + j] != cpu.merge(l)[global];
            }
      }
    flips = static_cast<int>(SumOver(groups->world(), flips));
    // The DP mean of the ranks' results is the global batch's (equal label counts per rank).
    const double dp = layout.dp_size;
    const double lm = SumOver(host_dp, rg.lm_loss) / dp, cr = SumOver(host_dp, rg.cr_loss) / dp;
    const double merge = SumOver(host_dp, rg.merge_fraction) / dp;
    std::printf("[ %s tp %d dp %d ] %-12s micro %d  lm %.6f / %.6f  cr %.6f / %.6f  merge %.4f / "
                "%.4f  (gpu / cpu), %d flips\n",
                comm_name, tp_size, layout.dp_size, tc.name, m, lm, rc.lm_loss, cr, rc.cr_loss,
                merge, rc.merge_fraction, flips);
    EXPECT_LE(std::fabs(lm - rc.lm_loss) / rc.lm_loss, kLossTol)
        << "micro-batch " << m << ": LM loss " << lm << " on the GPU, " << rc.lm_loss << " on the CPU";
    if (tc.dmc) {
      // Relaxed: a noisy decision σ(a + noise) may round the other way where a + noise ≈ 0;
      // about 0.5 flips are expected per 2 sequences (tests/cuda/test_cuda_model.cpp).
      EXPECT_LE(flips, tc.mode == DmcDecisionMode::kHard ? 0 : 2 * G) << "micro-batch " << m;
      // One flip moves one sequence's mean merge by 1 / (L·T·Hkv).
      const double bound = flips / (double(L) * T * Hkv * G) + 2e-5;
      EXPECT_GT(rc.cr_loss, 0.0);
      EXPECT_LE(std::fabs(cr - rc.cr_loss), bound)
          << "micro-batch " << m << ": CR loss " << cr << " on the GPU, " << rc.cr_loss
          << " on the CPU (the TP ranks' merge statistics must be summed over TP first)";
      EXPECT_LE(std::fabs(merge - rc.merge_fraction), bound)
          << "micro-batch " << m << ": merge fraction " << merge << " on the GPU, "
          << rc.merge_fraction << " on the CPU";
      ASSERT_EQ(rg.layer_merge_fraction.size(), static_cast<size_t>(L));
      for (int l = 0; l < L; ++l) {
        const double f = SumOver(host_dp, rg.layer_merge_fraction[l]) / dp;
        EXPECT_LE(std::fabs(f - rc.layer_merge_fraction[l]), flips / (double(G) * T * Hkv) + 1e-5)
            << "micro-batch " << m << ", layer " << l << ": merge fraction " << f
            << " on the GPU, " << rc.layer_merge_fraction[l] << " on the CPU";
      }
    } else {
      EXPECT_EQ(rg.cr_loss, 0.0);
      EXPECT_TRUE(rg.layer_merge_fraction.empty());
    }

    cpu.Backward(0.5);
    const bool last = m == 1;
    bucketed.Backward(0.5, last ? &groups->dp() : nullptr);
    plain.Backward(0.5);
  }
  const absl::Status averaged = plain.AverageGradients(groups->dp());
  ASSERT_TRUE(averaged.ok()) << averaged;

  double replica_b = 0, replica_p = 0;
  const std::vector<float> gb = Unshard(host_tp, bucketed.GradsToHost(), cpu, specs, &replica_b);
  const std::vector<float> gp = Unshard(host_tp, plain.GradsToHost(), cpu, specs, &replica_p);
  EXPECT_LE(replica_b, 1e-6) << "a replicated tensor's gradient differs between the TP ranks";
  EXPECT_LE(replica_p, 1e-6) << "a replicated tensor's gradient differs between the TP ranks";
  const std::vector<float>& gc = cpu.grads();
  double worst = 0, worst_same = 0;
  for (const ParamSpec& s : cpu.param_specs()) {
    const double err = RelError(gb.data() + s.offset, gc.data() + s.offset, s.size);
    const double same = RelError(gb.data() + s.offset, gp.data() + s.offset, s.size);
    worst = std::max(worst, err);
    worst_same = std::max(worst_same, same);
    if (layout.world_rank == 0)
      std::printf("[ error ] %-12s grad %-47s rel %.3e vs cpu, %.3e bucketed vs plain\n", tc.name,
                  s.name.c_str(), err, same);
    EXPECT_LE(err, s.shape.size() == 1 ? kNormGradTol : kGradTol)
        << s.name << ": the TP-gathered, DP-averaged gradient (bucketed reduction) differs from the "
        << "single-process CPU gradient on the global batch by " << err;
    EXPECT_LE(same, kSameTol) << s.name << ": the bucketed DP reduction overlapped with the "
                              << "backward pass differs from AverageGradients after it by " << same;
  }
  if (layout.world_rank == 0)
    std::printf("[ %s tp %d dp %d ] %-12s worst gradient error %.3e vs cpu (tol %.0e), %.3e "
                "bucketed vs plain (tol %.0e)\n",
                comm_name, tp_size, layout.dp_size, tc.name, worst, kGradTol, worst_same, kSameTol);
  std::fflush(stdout);
}

// ZeRO-1 (model/zero1_shard.h): a CUDA model with its AdamW moments sharded over DP against one
// without, for three steps from the same weights. The sharded model is handed the unsharded one's
// DP-averaged gradients (the attention backward's fp32 atomics would otherwise make two backward
// passes differ in the last bits), so the update is exactly comparable: the fp32 master weights,
// the norm and this rank's slice of the moments must be bit-identical, and the next forward, which
// reads the bf16 copy refreshed after the all-gather, must give the same loss.
void ExpectZero1MatchesUnsharded(int tp_size, Comms comms) {
  auto world = testing::TestWorld();
  ASSERT_NE(world, nullptr);
  std::optional<parallel::ProcessGroups> groups;
  std::string skip;
  MakeGpuGroups(*world, tp_size, comms, &groups, &skip);
  if (!skip.empty()) GTEST_SKIP() << skip;
  ASSERT_TRUE(groups.has_value());
  const parallel::ParallelLayout& layout = groups->layout();
  if (layout.dp_size == 1) GTEST_SKIP() << "needs dp > 1";
  const Case tc{"zero1", true, DmcDecisionMode::kRelaxed, 128, 2, 2, false};
  const model::LlamaConfig config = MakeConfig(tc);
  model::Llama<float> cpu(config, nullptr);  // the initial weights
  ShapeWeights(&cpu, 7);
  model::LlamaCuda plain(config, &groups->tp());
  model::LlamaCuda sharded(config, &groups->tp(), &groups->dp());
  const std::vector<float> shard =
      ShardOf(cpu, cpu.params(), plain.param_specs(), layout.tp_rank, tp_size);
  plain.CopyParamsFromHost(shard);
  sharded.CopyParamsFromHost(shard);
  const model::Zero1Shard& z = sharded.optimizer_shard();
  ASSERT_EQ(z.counts.size(), static_cast<size_t>(layout.dp_size));
  EXPECT_LT(z.slice.size, plain.num_params()) << "the sharded model keeps every moment";

  model::CudaAdamWSettings adamw;
  adamw.lr = 1e-2f;
  adamw.grad_clip = 0.5f;  // below the norm: the clipping scale matters
  model::StepOptions opt;
  opt.mode = tc.mode;
  opt.noise_seed = 1234;
  opt.cr_prior = 0.75f;
  const int B = 2, G = B * layout.dp_size, T = 33;
  for (int step = 0; step < 3; ++step) {
    std::vector<int32_t> in, tgt;
    MakeBatch(G, T, config.vocab_size, step, &in, &tgt);
    const size_t first = static_cast<size_t>(layout.dp_rank) * B * T;
    const std::vector<int32_t> my_in(in.begin() + first, in.begin() + first + B * T);
    const std::vector<int32_t> my_tgt(tgt.begin() + first, tgt.begin() + first + B * T);
    opt.step = step;
    opt.seq0 = static_cast<long>(layout.dp_rank) * B;
    plain.ZeroGrad();
    const model::ForwardResult rp = plain.Forward(my_in.data(), my_tgt.data(), B, T, opt);
    const model::ForwardResult rs = sharded.Forward(my_in.data(), my_tgt.data(), B, T, opt);
    // Equal weights give equal losses; the bound only allows for reduction order in the kernels.
    EXPECT_NEAR(rs.loss, rp.loss, 1e-6 * std::fabs(rp.loss)) << "step " << step;
    plain.Backward(1.0, &groups->dp());
    sharded.GradsFromHost(plain.GradsToHost());
    const double norm_plain = plain.OptimizerStep(adamw);
    const double norm_sharded = sharded.OptimizerStep(adamw);
    EXPECT_EQ(norm_sharded, norm_plain) << "step " << step;
    EXPECT_GT(norm_plain, adamw.grad_clip) << "step " << step;
    EXPECT_TRUE(sharded.ParamsToHost() == plain.ParamsToHost())
        << "step " << step << ": the all-gathered ZeRO-1 master weights differ from the unsharded";
    std::vector<float> pm, pv, sm, sv;
    plain.OptimizerStateToHost(&pm, &pv);
    sharded.OptimizerStateToHost(&sm, &sv);
    ASSERT_EQ(sm.size(), z.slice.size);
    ASSERT_EQ(sv.size(), z.slice.size);
    EXPECT_TRUE(std::equal(sm.begin(), sm.end(), pm.begin() + z.slice.begin)) << "m, step " << step;
    EXPECT_TRUE(std::equal(sv.begin(), sv.end(), pv.begin() + z.slice.begin)) << "v, step " << step;
  }
  if (layout.world_rank == 0)
    std::printf("[ %s tp %d dp %d ] zero1: 3 steps bit-identical to the unsharded optimizer\n",
                comms == Comms::kNccl ? "nccl" : "mpi", tp_size, layout.dp_size);
  std::fflush(stdout);
}

TEST(CudaZero1, DataParallelOnMpiEqualsUnsharded) { ExpectZero1MatchesUnsharded(1, Comms::kMpi); }
TEST(CudaZero1, DataTimesTensorParallelOnMpiEqualsUnsharded) {
  ExpectZero1MatchesUnsharded(2, Comms::kMpi);
}
TEST(CudaZero1, DataParallelOnNcclEqualsUnsharded) { ExpectZero1MatchesUnsharded(1, Comms::kNccl); }
TEST(CudaZero1, DataTimesTensorParallelOnNcclEqualsUnsharded) {
  ExpectZero1MatchesUnsharded(2, Comms::kNccl);
}

// TP 4 needs 4 KV heads (the parameterised cases have 2): 4 ranks, one head and a quarter of the
// MLP and of the vocabulary each.
constexpr Case kFourKvHeads{"tp4", true, DmcDecisionMode::kRelaxed, 256, 4, 4, false};
TEST(CudaParallelStepTp4, TensorParallelFourOnMpiEqualsCpu) {
  ExpectStepMatchesCpu(kFourKvHeads, 4, Comms::kMpi);
}
TEST(CudaParallelStepTp4, TensorParallelFourOnNcclEqualsCpu) {
  ExpectStepMatchesCpu(kFourKvHeads, 4, Comms::kNccl);
}

class CudaParallelStep : public ::testing::TestWithParam<Case> {};

TEST_P(CudaParallelStep, TensorParallelTwoOnMpiEqualsCpu) {
  ExpectStepMatchesCpu(GetParam(), 2, Comms::kMpi);
}
TEST_P(CudaParallelStep, DataParallelOnMpiEqualsCpu) {
  ExpectStepMatchesCpu(GetParam(), 1, Comms::kMpi);
}
TEST_P(CudaParallelStep, TensorParallelTwoOnNcclEqualsCpu) {
  ExpectStepMatchesCpu(GetParam(), 2, Comms::kNccl);
}
TEST_P(CudaParallelStep, DataParallelOnNcclEqualsCpu) {
  ExpectStepMatchesCpu(GetParam(), 1, Comms::kNccl);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, CudaParallelStep,
    ::testing::Values(Case{"vanilla", false, DmcDecisionMode::kRelaxed, 128, 2, 2, false},
                      Case{"dmc_relaxed", true, DmcDecisionMode::kRelaxed, 128, 2, 2, false},
                      Case{"gqa_hard_tied", true, DmcDecisionMode::kHard, 256, 4, 2, true},
                      Case{"gqa_relaxed", true, DmcDecisionMode::kRelaxed, 256, 4, 2, false}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace dmc::cuda_test
