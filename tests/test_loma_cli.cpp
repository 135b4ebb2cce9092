// LoMA through the tools: the trainer's LoMA step (dmc-train --method=loma) and its flag checks,
// the loma method of dmc-eval against the training-layout forward, and dmc-generate on a LoMA
// model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>

#include "absl/strings/match.h"
#include "data/tokenizer.h"
#include "inference/cache_policy.h"
#include "inference/cpu_engine.h"
#include "inference/evaluate.h"
#include "inference/hf_model.h"
#include "inference/scheduler.h"
#include "model/llama.h"
#include "model/loma.h"
#include "parallel/communicator.h"
#include "tests/serve_process.h"
#include "tests/tiny_models.h"
#include "trainer/trainer.h"

namespace dmc {
namespace {

constexpr int kVocab = 16;

model::LlamaConfig TinyConfig() {
  model::LlamaConfig c;
  c.vocab_size = kVocab;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 64;
  return c;
}

// Random windows of seq_len + 1 tokens below kVocab, as ShardLoader yields them.
std::vector<std::vector<int32_t>> RandomWindows(int n, int seq_len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int32_t>> windows(n, std::vector<int32_t>(seq_len + 1));
  for (auto& w : windows)
    for (auto& x : w) x = static_cast<int32_t>(rng() % kVocab);
  return windows;
}

// The same micro-batch every time: inputs and next-token targets of the windows.
trainer::BatchSource RepeatedBatch(const std::vector<std::vector<int32_t>>& windows) {
  return [windows](std::vector<int32_t>* in, std::vector<int32_t>* tgt) {
    in->clear();
    tgt->clear();
    for (const auto& w : windows) {
      in->insert(in->end(), w.begin(), w.end() - 1);
      tgt->insert(tgt->end(), w.begin() + 1, w.end());
    }
    return absl::OkStatus();
  };
}

model::LomaLayout Layout(int t, int c) {
  absl::StatusOr<model::LomaLayout> layout = model::MakeLomaLayout(kVocab, t, c);
  EXPECT_TRUE(layout.ok()) << layout.status();
  return *layout;
}

trainer::TrainConfig LomaTrainConfig() {
  trainer::TrainConfig tc;
  tc.seq_len = 16;
  tc.micro_batch = 4;
  tc.schedule.pretrain_steps = 40;
  tc.schedule.lr = 1e-2f;
  tc.schedule.min_lr = 1e-3f;
  tc.schedule.warmup_steps = 4;
  tc.optimizer.weight_decay = 0.0f;
  tc.loma = Layout(2, 2);
  return tc;
}

TEST(LomaTrainer, RepetitionLossFallsOnARepeatedBatch) {
  parallel::LocalCommunicator dp, tp;
  model::Llama<float> base(TinyConfig(), &tp);
  base.InitRandom(3);
  const trainer::TrainConfig tc = LomaTrainConfig();
  std::unique_ptr<model::Llama<float>> m = model::AddLomaTokens(base, &tp, tc.loma.zones);
  EXPECT_EQ(m->config().loma.zones.t, 2);
  EXPECT_EQ(m->config().loma.zones.c, 2);
  EXPECT_EQ(m->config().loma.memory_token, kVocab);
  EXPECT_EQ(m->config().loma.repetition_token, kVocab + 1);
  ASSERT_TRUE(tc.Validate(m->config()).ok());
  trainer::Trainer trainer(tc, m.get(), RepeatedBatch(RandomWindows(tc.micro_batch, tc.seq_len, 9)),
                           &dp, &tp);
  std::vector<trainer::StepMetrics> metrics;
  while (trainer.step() < tc.schedule.total_steps()) {
    absl::StatusOr<trainer::StepMetrics> r = trainer.Step();
    ASSERT_TRUE(r.ok()) << r.status();
    metrics.push_back(*r);
  }
  const trainer::StepMetrics &first = metrics.front(), &last = metrics.back();
  std::printf("rep loss %.4f -> %.4f, lm loss %.4f -> %.4f\n", first.rep_loss, last.rep_loss,
              first.lm_loss, last.lm_loss);
  for (const trainer::StepMetrics& s : metrics) {
    EXPECT_EQ(s.phase, trainer::Phase::kLoma);
    EXPECT_TRUE(std::isfinite(s.rep_loss) && s.rep_loss > 0) << s.rep_loss;
    EXPECT_NEAR(s.loss, s.lm_loss + s.rep_loss, 1e-9);
    EXPECT_EQ(s.cr_loss, 0.0);
  }
  EXPECT_NEAR(first.rep_loss, std::log(kVocab + 2.0), 0.3);  // uniform at the start
  EXPECT_LT(last.rep_loss, 0.5 * first.rep_loss);
  EXPECT_LT(last.lm_loss, first.lm_loss);
  EXPECT_EQ(last.achieved_cr, 2.0);
  EXPECT_EQ(last.tokens, int64_t{40} * 4 * 16);  // text tokens, not layout positions

  const std::string line = trainer::FormatProgress(first, 40);
  EXPECT_TRUE(absl::StrContains(line, "| loma     | loss")) << line;
  EXPECT_TRUE(absl::StrContains(line, ", rep ")) << line;
  EXPECT_TRUE(absl::StrContains(line, "| CR 2.00 |")) << line;
  EXPECT_FALSE(absl::StrContains(line, "CR target")) << line;
}

TEST(LomaTrainer, RefusesAModelThatDoesNotCarryTheLayout) {
  parallel::LocalCommunicator dp, tp;
  model::Llama<float> base(TinyConfig(), &tp);
  base.InitRandom(3);
  const trainer::TrainConfig tc = LomaTrainConfig();
  const auto batches = RepeatedBatch(RandomWindows(tc.micro_batch, tc.seq_len, 9));
  std::unique_ptr<model::Llama<float>> unmarked = model::AddLomaTokens(base, &tp);  // no zones
  std::unique_ptr<model::Llama<float>> other = model::AddLomaTokens(base, &tp, {2, 4});
  for (model::Llama<float>* m : {&base, unmarked.get(), other.get()}) {
    trainer::Trainer trainer(tc, m, batches, &dp, &tp);
    absl::StatusOr<trainer::StepMetrics> r = trainer.Step();
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(absl::StrContains(r.status().message(), "AddLomaTokens")) << r.status();
    EXPECT_EQ(trainer.step(), 0);
  }
}

TEST(LomaTrainConfig, RejectsBadValuesNamingTheFlag) {
  const model::LlamaConfig mc = TinyConfig();
  const trainer::TrainConfig ok = LomaTrainConfig();
  ASSERT_TRUE(ok.Validate(mc).ok());
  struct Case {
    void (*mutate)(trainer::TrainConfig&);
    const char* expected;
  };
  const Case cases[] = {
      {[](trainer::TrainConfig& c) { c.seq_len = 18; },
       "--seq_len 18 must be a multiple of --loma_t × --loma_c = 4"},
      {[](trainer::TrainConfig& c) { c.schedule.stage1_steps = 5; },
       "--stage1_steps must be 0 with --method=loma"},
      {[](trainer::TrainConfig& c) { c.schedule.stage2_steps = 5; },
       "--stage2_steps must be 0 with --method=loma"},
      {[](trainer::TrainConfig& c) { c.schedule.stage3_steps = 5; },
       "--stage3_steps must be 0 with --method=loma"},
      {[](trainer::TrainConfig& c) { c.loma.zones.c = 0; }, "--loma_c must be >= 1"},
  };
  for (const Case& k : cases) {
    trainer::TrainConfig c = ok;
    k.mutate(c);
    const absl::Status s = c.Validate(mc);
    EXPECT_FALSE(s.ok()) << k.expected;
    EXPECT_TRUE(absl::StrContains(s.message(), k.expected)) << s.message();
  }
}

// dmc-train refuses inconsistent LoMA flags before touching any data (none is given here).
TEST(LomaTrainCli, FlagErrorsNameTheFlag) {
  const std::string binary = std::string(DMC_BINARY_DIR) + "/trainer/dmc-train";
  if (!std::filesystem::exists(binary)) GTEST_SKIP() << binary << " is not built";
  const std::pair<const char*, const char*> cases[] = {
      {"--method=lomax", "--method=lomax: expected dmc, dms or loma"},
      {"--method=loma --loma_t=2", "--method=loma needs --loma_t >= 1 and --loma_c >= 1"},
      {"--loma_t=2 --loma_c=4", "--loma_t and --loma_c apply only with --method=loma"},
      {"--method=loma --loma_t=2 --loma_c=4 --model=tiny --seq_len=30 --pretrain_steps=1",
       "--seq_len 30 must be a multiple of --loma_t × --loma_c = 8"},
      {"--method=loma --loma_t=2 --loma_c=4 --model=tiny --seq_len=32 --pretrain_steps=1 "
       "--stage2_steps=3 --cr_target=2",
       "--stage2_steps must be 0 with --method=loma"},
  };
  for (const auto& [flags, expected] : cases) {
    std::FILE* p = popen((binary + " " + flags + " 2>&1").c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[512];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    EXPECT_NE(pclose(p), 0) << flags;
    EXPECT_TRUE(absl::StrContains(out, expected)) << flags << ": " << out;
  }
}

// The loma row of dmc-eval (the CPU engine's loma method under the scheduler) equals what the
// training-layout forward computes at the reading positions (in double), and reports the cache
// the engine really keeps.
TEST(LomaEval, PerplexityEqualsTheTrainingForwardOnReadingZones) {
  model::Llama<float> base(TinyConfig(), nullptr);
  base.InitRandom(5);
  // Matrices at std 0.1: predictions far from uniform, so the comparison means something.
  for (const auto& s : base.param_specs())
    if (s.shape.size() == 2)
      for (size_t i = 0; i < s.size; ++i) base.params()[s.offset + i] *= 5.0f;
  const model::LomaLayout layout = Layout(2, 3);  // segments of 6 tokens, 2 memory slots
  std::unique_ptr<model::Llama<float>> m = model::AddLomaTokens(base, nullptr, layout.zones);
  const int n = 5, seq_len = 12;
  const auto windows = RandomWindows(n, seq_len, 11);

  absl::StatusOr<inference::CacheMethod> method = inference::ParseCacheMethod("loma");
  ASSERT_TRUE(method.ok()) << method.status();
  EXPECT_STREQ(inference::CacheMethodName(*method), "loma");
  inference::EvalOptions eo;
  eo.policy = *inference::PolicyForCr(*method, seq_len, 1.0);
  eo.max_batch = 2;  // 2 windows at a time
  eo.page_size = 1;  // pages of one slot: the bytes count slots exactly
  // Progress: one call per prediction, counting up to the total.
  long calls = 0;
  const auto count_progress = [&](long done, long total) {
    EXPECT_EQ(done, ++calls);
    EXPECT_EQ(total, n * seq_len);
  };
  eo.progress = count_progress;
  absl::StatusOr<inference::EvalResult> r = inference::Evaluate(*m, windows, eo);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(calls, n * seq_len);
  eo.progress = nullptr;

  model::Llama<double> ref(m->config(), nullptr);
  for (size_t i = 0; i < ref.params().size(); ++i) ref.params()[i] = m->params()[i];
  std::vector<int32_t> in, tgt;
  ASSERT_TRUE(RepeatedBatch(windows)(&in, &tgt).ok());
  absl::StatusOr<model::LomaBatch> batch =
      model::LomaTransform(layout, in.data(), tgt.data(), n, seq_len);
  ASSERT_TRUE(batch.ok()) << batch.status();
  model::StepOptions opt;
  opt.loma = layout.zones;
  const model::ForwardResult f =
      ref.Forward(batch->tokens.data(), batch->targets.data(), n, batch->seq_len, opt);
  long hits = 0;
  const int V = m->config().vocab_size;
  for (int p = 0; p < n * batch->seq_len; ++p) {
    if (kernels::loma_zone(p % batch->seq_len, layout.zones) != kernels::LomaZone::kReading)
      continue;
    const double* logits = ref.logits().data() + static_cast<size_t>(p) * V;
    hits += std::max_element(logits, logits + V) - logits == batch->targets[p];
  }
  std::printf("loma perplexity %.6f (training forward %.6f), accuracy %.4f\n", r->perplexity,
              std::exp(f.lm_loss), r->accuracy);
  EXPECT_EQ(r->predictions, n * seq_len);
  EXPECT_NEAR(r->perplexity, std::exp(f.lm_loss), 1e-4 * std::exp(f.lm_loss));
  EXPECT_GT(std::abs(r->perplexity - V), 1.0) << "the model must not be uniform";
  EXPECT_DOUBLE_EQ(r->accuracy, static_cast<double>(hits) / (n * seq_len));
  // two whole segments per window: 4 memory slots for 12 tokens in every head
  EXPECT_DOUBLE_EQ(r->cr, 3.0);
  for (double x : r->head_cr) EXPECT_DOUBLE_EQ(x, 3.0);
  // peak per sequence: 2 memory slots + a full segment + the 2 <m> of its compression, for the
  // two windows decoded together
  const long slot_bytes = 2L * 2 * 2 * 8 * sizeof(float);  // K and V × layers × KV heads × D
  EXPECT_EQ(r->peak_kv_bytes, 2 * 10 * slot_bytes);
  EXPECT_EQ(r->max_sequence_bytes, 4 * slot_bytes);  // what a window holds at its end
  EXPECT_EQ(r->max_concurrent, 2);
  EXPECT_EQ(r->preemptions, 0);
  EXPECT_GT(r->tokens_per_second, 0);

  // One slot short of two peaks: the second window is preempted at its second compression and
  // recomputed, the figures unchanged; short of one peak, the window cannot run at all.
  eo.budget_bytes = 2 * 10 * slot_bytes - 1;
  absl::StatusOr<inference::EvalResult> tight = inference::Evaluate(*m, windows, eo);
  ASSERT_TRUE(tight.ok()) << tight.status();
  EXPECT_GT(tight->preemptions, 0);
  EXPECT_LE(tight->peak_kv_bytes, eo.budget_bytes);
  EXPECT_NEAR(tight->perplexity, r->perplexity, 1e-9 * r->perplexity);
  EXPECT_DOUBLE_EQ(tight->accuracy, r->accuracy);
  eo.budget_bytes = 10 * slot_bytes - 1;
  r = inference::Evaluate(*m, windows, eo);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::StrContains(r.status().message(), "does not fit the KV cache even alone"))
      << r.status();
  r = inference::Evaluate(base, windows, eo);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::StrContains(r.status().message(), "needs a LoMA model")) << r.status();

  // The paged path reports its progress the same way.
  eo.policy = *inference::PolicyForCr(inference::CacheMethod::kVanilla, seq_len, 1.0);
  eo.budget_bytes = 1L << 28;
  eo.progress = count_progress;
  calls = 0;
  r = inference::Evaluate(base, windows, eo);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(calls, n * seq_len);
}

// dmc-generate on an exported LoMA model decodes with the loma method by default (token by token
// on the CPU engine, several compressions) and prints what the engine generates greedily under
// the scheduler; --method=loma on a model without the layout is refused by name.
TEST(LomaGenerateCli, DefaultsToTheLomaCacheAndEqualsTheEngine) {
  const std::string binary = serve_test::InferenceBinary("dmc-generate");
  if (!std::filesystem::exists(binary)) GTEST_SKIP() << binary << " is not built";
  serve_test::TempRoot temp("dmc_loma_generate");
  model::LlamaConfig config = tiny_models::TinyLlama(259 + 2, 2);  // bytes, BOS, EOS, <m>, <r>
  config.bos_token_id = 256;
  config.eos_token_id = 257;
  absl::StatusOr<model::LomaLayout> layout = model::MakeLomaLayout(259, 2, 3);
  ASSERT_TRUE(layout.ok()) << layout.status();
  config.loma = *layout;
  const std::string dir = serve_test::ExportRandomModel(config, 4, temp.path / "loma");
  const std::string prompt = "In the beginning";
  const int new_tokens = 20;
  const auto run = [&](const std::string& flags) {
    std::FILE* p = popen((binary + " " + flags + " 2>&1").c_str(), "r");
    std::string out;
    char buf[512];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    return std::make_pair(pclose(p), out);
  };
  const auto [rc, out] = run("--model=" + dir + " --prompt='" + prompt +
                             "' --max_new_tokens=" + std::to_string(new_tokens));
  ASSERT_EQ(rc, 0) << out;
  EXPECT_TRUE(absl::StrContains(out, "layer-heads, loma)")) << out;

  absl::StatusOr<std::unique_ptr<model::Llama<float>>> m = inference::LoadHfModel(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  auto tokenizer = data::LoadTokenizer("byte");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  inference::CachePolicy policy;
  policy.method = inference::CacheMethod::kLoma;
  auto engine = inference::CpuEngine<float>::Create(**m, policy, 1L << 24, 16);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::vector<inference::Request> requests(1);
  requests[0].tokens = (*tokenizer)->Encode(prompt);
  requests[0].length = static_cast<int>(prompt.size()) + new_tokens - 1;
  requests[0].prefill = true;
  std::vector<int32_t> generated;
  auto stats = inference::RunBatched(
      **engine, requests, 1,
      [&](int, int pos, const inference::TokenOutput& o) {
        if (pos + 1 < static_cast<int>(prompt.size())) return true;
        if (o.next == (*tokenizer)->eos_id()) return false;
        generated.push_back(o.next);
        return true;
      },
      [](int, bool) {});
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->prefill_tokens, 0) << "loma prompts go token by token";
  // (stderr's summary line may come first: stdout is buffered until exit)
  EXPECT_TRUE(absl::StrContains(out, prompt + (*tokenizer)->Decode(generated) + "\n")) << out;

  model::LlamaConfig plain = config;
  plain.loma = {};
  const std::string plain_dir = serve_test::ExportRandomModel(plain, 4, temp.path / "plain");
  const auto [refused, message] = run("--model=" + plain_dir + " --prompt=x --method=loma");
  EXPECT_NE(refused, 0);
  EXPECT_TRUE(absl::StrContains(message, "is not a LoMA model")) << message;
}

}  // namespace
}  // namespace dmc
