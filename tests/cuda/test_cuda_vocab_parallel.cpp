// GPU vs CPU reference: the vocabulary-parallel embedding and cross-entropy (kernels/embedding.h,
// kernels/cross_entropy.h). The vocabulary is split unevenly into shards (one of them not a
// multiple of 8, so both the vector and the scalar paths run); each shard's kernels run on its
// rows only, and their combination must equal the CPU reference on the whole vocabulary.
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "tests/cuda/cuda_test_util.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

class CudaVocabParallel : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

const std::vector<std::pair<int, int>> kShards = {{0, 1024}, {1024, 997}, {2021, 1000}};  // begin, rows
constexpr int kVocab = 3021;

TEST_F(CudaVocabParallel, EmbeddingShards) {
  const int N = 257, C_ = 192;
  std::vector<int32_t> tok(N);
  std::uniform_int_distribution<int> d(0, kVocab - 1);
  for (auto& t : tok) t = d(rng());
  tok[0] = 0;
  tok[1] = tok[2] = 1024;  // first row of a shard, repeated
  tok[3] = kVocab - 1;
  auto wte = randn(static_cast<size_t>(kVocab) * C_);
  auto wte_b = to_bf16(wte);
  auto g = randn(static_cast<size_t>(N) * C_);
  auto g_b = to_bf16(g);
  DevBuf<int32_t> dtok(tok);
  DevBuf<bf16> dg(g_b);
  for (const auto& [begin, rows] : kShards) {
    const std::vector<bf16> part(wte_b.begin() + size_t(begin) * C_,
                                 wte_b.begin() + size_t(begin + rows) * C_);
    DevBuf<bf16> dwte(part), dout(static_cast<size_t>(N) * C_);
    dout.poison();
    C::embedding_forward(dout, dtok, dwte, N, C_, begin, rows);
    std::vector<double> ref(static_cast<size_t>(N) * C_);
    K::embedding_forward<double>(ref.data(), tok.data(), wte.data() + size_t(begin) * C_, N, C_,
                                 begin, rows);
    expect_close("embedding shard fwd (zeros for other shards' tokens)", dout.download(), ref, 0.0);

    auto acc = randn(static_cast<size_t>(rows) * C_);
    auto acc_f = to_f32(acc);
    DevBuf<float> dacc(acc_f);
    C::embedding_backward(dacc, dg, dtok, N, C_, begin, rows);
    K::embedding_backward<double>(acc.data(), g.data(), tok.data(), N, C_, begin, rows);
    expect_close("embedding shard bwd (dwte +=, own rows only)", dacc.download(), acc, kF32Tol);
  }
}

TEST_F(CudaVocabParallel, CrossEntropyShards) {
  const int N = 37;
  auto logits = randn(static_cast<size_t>(N) * kVocab, 3.0);
  auto lb = to_bf16(logits);
  std::vector<int32_t> tgt(N);
  std::uniform_int_distribution<int> d(0, kVocab - 1);
  for (auto& t : tgt) t = d(rng());
  tgt[2] = -1;  // unlabelled
  tgt[4] = 1023;
  tgt[5] = 1024;  // the two sides of a shard boundary
  tgt[6] = kVocab - 1;
  DevBuf<int32_t> dt(tgt);
  auto shard_of = [&](const auto& full, int begin, int rows) {
    std::vector<typename std::decay_t<decltype(full)>::value_type> part(size_t(N) * rows);
    for (int n = 0; n < N; ++n)
      for (int v = 0; v < rows; ++v) part[size_t(n) * rows + v] = full[size_t(n) * kVocab + begin + v];
    return part;
  };

  // Every shard's statistics, on the device, then combined on the device.
  DevBuf<float> all_stats(kShards.size() * 2 * N);
  all_stats.poison();
  std::vector<std::unique_ptr<DevBuf<bf16>>> shard_logits;
  for (size_t s = 0; s < kShards.size(); ++s) {
    const auto [begin, rows] = kShards[s];
    shard_logits.push_back(std::make_unique<DevBuf<bf16>>(shard_of(lb, begin, rows)));
    C::cross_entropy_shard_stats(all_stats.ptr + s * 2 * N, *shard_logits.back(), dt, N, rows,
                                 begin);
  }
  DevBuf<float> dloss(N), dlse(N);
  dloss.poison();
  dlse.poison();
  C::cross_entropy_combine_shards(dloss, dlse, all_stats, dt, N, static_cast<int>(kShards.size()));
  std::vector<double> ref(N);
  K::cross_entropy_forward<double>(ref.data(), logits.data(), tgt.data(), N, kVocab);
  expect_close("cross_entropy combined shard losses", dloss.download(), ref, 1e-5);

  auto dls = randu(N, 0.1, 1.0);
  auto dlsf = to_f32(dls);
  DevBuf<float> ddls(dlsf);
  for (bool accumulate : {true, false}) {  // added onto random values, or written into NaN
    auto acc = grad_start(static_cast<size_t>(N) * kVocab, accumulate, 1e-4);
    auto accb = to_bf16(acc);
    std::vector<double> want = acc;
    K::cross_entropy_backward<double>(want.data(), logits.data(), tgt.data(), dls.data(), N,
                                      kVocab, accumulate);
    for (size_t s = 0; s < kShards.size(); ++s) {
      const auto [begin, rows] = kShards[s];
      DevBuf<bf16> dacc(shard_of(accb, begin, rows));
      C::cross_entropy_shard_backward(dacc, *shard_logits[s], dlse, dt, ddls, N, rows, begin,
                                      accumulate);
      expect_close(with_mode("cross_entropy shard bwd dlogits", accumulate),
                   dacc.download(), shard_of(want, begin, rows), kBf16Tol);
    }
  }
}

}  // namespace
}  // namespace dmc::cuda_test
