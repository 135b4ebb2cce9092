// Vocabulary-parallel embedding and LM head across all ranks of the job as one tensor-parallel
// group, with a vocabulary that does not divide (37 rows over 2 or 4 ranks: shards of unequal
// size). What the training-equivalence test does not reach: a TP checkpoint exported to one
// Hugging Face model equals the single-process model, and LoMA's vocabulary growth re-splits the
// shards the way a single process would.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "model/hf_weights.h"
#include "model/llama.h"
#include "model/loma.h"
#include "tests/mpi/mpi_test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/export.h"

namespace dmc {
namespace {

namespace fs = std::filesystem;

model::LlamaConfig Config() {
  model::LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.max_position_embeddings = 16;
  c.tie_word_embeddings = false;
  return c;
}

// The largest difference between this rank's shard of every tensor and the same slice of `full`.
double MaxShardError(const model::Llama<float>& shard, const model::Llama<float>& full) {
  double max_err = 0;
  for (const model::ParamSpec& s : shard.param_specs()) {
    const model::ParamSpec* f = full.FindParam(s.name);
    if (f == nullptr) return 1e30;
    const int64_t rows = s.shape[0], cols = s.shape.size() > 1 ? s.shape[1] : 1;
    const int64_t full_cols = s.full_shape.size() > 1 ? s.full_shape[1] : 1;
    const int64_t row0 = s.split_dim == 0 ? s.split_begin : 0;
    const int64_t col0 = s.split_dim == 1 ? s.split_begin : 0;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        max_err = std::max(max_err, std::fabs(double(shard.params()[s.offset + i * cols + j]) -
                                              full.params()[f->offset + (row0 + i) * full_cols +
                                                            col0 + j]));
  }
  return max_err;
}

TEST(VocabParallel, TpCheckpointExportsTheSingleProcessModel) {
  auto tp = testing::TestWorld("vocab-tp");
  ASSERT_NE(tp, nullptr);
  model::Llama<float> shard(Config(), tp.get());
  shard.InitRandom(11);
  const int rows = shard.vocab_rows();
  EXPECT_EQ(rows, model::TpShard(37, tp->rank(), tp->size()).size);

  // One directory for the whole job: rank 0 names it.
  std::string dir = (fs::temp_directory_path() /
                     ("dmc_vocab_tp_" + std::to_string(static_cast<long>(::getpid()))))
                        .string();
  int length = static_cast<int>(dir.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  dir.resize(length);
  MPI_Bcast(dir.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);

  trainer::AdamW optimizer(trainer::OptimizerConfig{}, shard.params().size());
  trainer::Checkpointer checkpointer(dir + "/ckpt", 1, tp.get(), tp->rank(), tp->size(), 0);
  ASSERT_TRUE(checkpointer.Save(shard, optimizer, trainer::TrainingState{}).ok());
  ASSERT_TRUE(tp->Barrier().ok());
  if (tp->rank() == 0) {
    ASSERT_TRUE(
        trainer::ExportCheckpoint(dir + "/ckpt", dir + "/hf", model::DType::kF32, 1 << 30).ok());
    model::Llama<float> exported(Config(), nullptr), want(Config(), nullptr);
    ASSERT_TRUE(model::ImportHfWeights(dir + "/hf", &exported).ok());
    want.InitRandom(11);
    EXPECT_EQ(exported.params(), want.params())
        << "the export of a " << tp->size() << "-rank checkpoint is not the single-process model";
    fs::remove_all(dir);
  }
  ASSERT_TRUE(tp->Barrier().ok());
}

TEST(VocabParallel, LomaTokensResplitTheVocabularyLikeOneProcess) {
  auto tp = testing::TestWorld("vocab-loma");
  ASSERT_NE(tp, nullptr);
  model::Llama<float> shard(Config(), tp.get()), full(Config(), nullptr);
  shard.InitRandom(3);
  full.InitRandom(3);
  const kernels::LomaZones zones{2, 2};
  const auto grown_shard = model::AddLomaTokens(shard, tp.get(), zones);
  const auto grown_full = model::AddLomaTokens(full, nullptr, zones);
  EXPECT_EQ(grown_shard->config().vocab_size, 39);
  // Every layout averages the same gathered table in the same order: equal to the last bit.
  EXPECT_EQ(MaxShardError(*grown_shard, *grown_full), 0.0)
      << "rank " << tp->rank() << " of " << tp->size();
}

}  // namespace
}  // namespace dmc
