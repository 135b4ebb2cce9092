#include "model/loma.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "absl/strings/str_format.h"

namespace dmc::model {

absl::StatusOr<LomaLayout> MakeLomaLayout(int base_vocab, int t, int c) {
  if (t < 1 || c < 1)
    return absl::InvalidArgumentError(
        absl::StrFormat("LoMA needs t >= 1 memory slots and a ratio c >= 1, got t %d, c %d", t, c));
  if (base_vocab < 1)
    return absl::InvalidArgumentError(absl::StrFormat("base vocabulary size %d", base_vocab));
  LomaLayout layout;
  layout.zones = {t, c};
  layout.memory_token = base_vocab;
  layout.repetition_token = base_vocab + 1;
  return layout;
}

absl::StatusOr<LomaBatch> LomaTransform(const LomaLayout& layout, const int32_t* tokens,
                                        const int32_t* targets, int B, int plain_len) {
  const kernels::LomaZones& z = layout.zones;
  const int tc = z.segment();
  if (!z.enabled() || z.c < 1 || plain_len <= 0 || plain_len % tc != 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "a LoMA window must be a positive multiple of t·c = %d tokens, got %d", tc, plain_len));
  const int chunks = plain_len / tc, S = z.chunk();
  LomaBatch out;
  out.seq_len = chunks * S;
  out.tokens.resize(static_cast<size_t>(B) * out.seq_len);
  out.targets.resize(out.tokens.size());
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < chunks; ++i) {
      const size_t plain = static_cast<size_t>(b) * plain_len + static_cast<size_t>(i) * tc;
      const size_t base = static_cast<size_t>(b) * out.seq_len + static_cast<size_t>(i) * S;
      for (int r = 0; r < tc; ++r) {
        out.tokens[base + r] = tokens[plain + r];
        out.targets[base + r] = targets[plain + r];
        out.tokens[base + tc + z.t + r] = layout.repetition_token;
        out.targets[base + tc + z.t + r] = tokens[plain + r];
      }
      for (int m = 0; m < z.t; ++m) {
        out.tokens[base + tc + m] = layout.memory_token;
        out.targets[base + tc + m] = -1;
      }
    }
  return out;
}

absl::Status CheckLomaStep(const kernels::LomaZones& z, int seq_len, const LlamaConfig& config) {
  if (z.c < 1 || seq_len % z.chunk() != 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "a LoMA sequence is whole chunks of t·(2c+1) = %d positions (t %d, c %d), got %d",
        z.chunk(), z.t, z.c, seq_len));
  if (config.dmc.enabled)
    return absl::InvalidArgumentError("LoMA and DMC do not combine: disable DMC for LoMA steps");
  const int text = seq_len / z.chunk() * z.segment();
  if (text > config.max_position_embeddings)
    return absl::InvalidArgumentError(
        absl::StrFormat("LoMA window of %d text tokens exceeds max_position_embeddings %d", text,
                        config.max_position_embeddings));
  return absl::OkStatus();
}

std::vector<int32_t> LomaPositions(const kernels::LomaZones& z, int seq_len) {
  std::vector<int32_t> positions(seq_len);
  for (int p = 0; p < seq_len; ++p) positions[p] = kernels::loma_position(p, z);
  return positions;
}

template <typename T>
LomaLosses LomaZoneLosses(const T* losses, const int32_t* targets, int B, int seq_len,
                          const kernels::LomaZones& z, std::vector<double>* weights) {
  // [0]: reading, [1]: repetition; memory positions carry no label.
  double sum[2] = {0, 0}, count[2] = {0, 0};
  auto zone_of = [&](int n) -> int {
    if (targets[n] < 0) return -1;
    switch (kernels::loma_zone(n % seq_len, z)) {
      case kernels::LomaZone::kReading: return 0;
      case kernels::LomaZone::kRepetition: return 1;
      case kernels::LomaZone::kMemory: return -1;
    }
    return -1;
  };
  const int N = B * seq_len;
  for (int n = 0; n < N; ++n)
    if (const int zone = zone_of(n); zone >= 0) {
      sum[zone] += losses[n];
      count[zone] += 1;
    }
  if (weights) {
    weights->assign(N, 0.0);
    for (int n = 0; n < N; ++n)
      if (const int zone = zone_of(n); zone >= 0) (*weights)[n] = 1.0 / count[zone];
  }
  LomaLosses out;
  out.reading = count[0] > 0 ? sum[0] / count[0] : 0.0;
  out.repetition = count[1] > 0 ? sum[1] / count[1] : 0.0;
  return out;
}

namespace {

// The whole [V, C] table of a vocabulary-parallel tensor (local: this rank's rows), on every rank.
// Each rank sends a buffer of the largest shard's size, since the collective needs equal counts.
template <typename T>
std::vector<T> GatherVocabRows(const T* local, const ParamSpec& spec, parallel::Communicator& tp) {
  const int64_t V = spec.full_shape[0], C = spec.full_shape[1];
  const int ranks = tp.size();
  const size_t chunk = static_cast<size_t>(TpShard(V, 0, ranks).size * C);  // rank 0 holds most
  std::vector<T> send(chunk, T(0)), recv(chunk * ranks);
  std::copy(local, local + spec.size, send.begin());
  if (absl::Status s = tp.AllGather(send.data(), recv.data(), chunk); !s.ok())
    throw std::runtime_error("gathering " + spec.name + " over the tensor-parallel group: " +
                             s.ToString());
  std::vector<T> full(static_cast<size_t>(V * C));
  for (int r = 0; r < ranks; ++r) {
    const TpSlice rows = TpShard(V, r, ranks);
    std::copy(recv.begin() + r * chunk, recv.begin() + r * chunk + rows.size * C,
              full.begin() + rows.begin * C);
  }
  return full;
}

}  // namespace

template <typename T>
std::unique_ptr<Llama<T>> AddLomaTokens(const Llama<T>& base, parallel::Communicator* tp,
                                        const kernels::LomaZones& zones) {
  parallel::LocalCommunicator single_process;
  parallel::Communicator& group = tp ? *tp : single_process;
  LlamaConfig config = base.config();
  const int64_t V = config.vocab_size;
  config.vocab_size += 2;
  if (zones.enabled()) config.loma = {zones, static_cast<int32_t>(V), static_cast<int32_t>(V + 1)};
  auto grown = std::make_unique<Llama<T>>(config, tp);
  for (const ParamSpec& spec : grown->param_specs()) {
    const ParamSpec* old = base.FindParam(spec.name);
    const T* src = base.params().data() + old->offset;
    T* dst = grown->params().data() + spec.offset;
    if (old->full_shape == spec.full_shape) {
      std::copy(src, src + old->size, dst);
      continue;
    }
    // Embedding or LM head [V, C] → [V + 2, C], split by vocabulary rows: the shard boundaries
    // move, so gather the old table, append the two mean rows, and keep this rank's rows.
    const int64_t C = spec.shape[1];
    std::vector<T> table = GatherVocabRows(src, *old, group);
    table.resize(static_cast<size_t>((V + 2) * C));
    for (int64_t c = 0; c < C; ++c) {
      double mean = 0;
      for (int64_t v = 0; v < V; ++v) mean += table[v * C + c];
      mean /= static_cast<double>(V);
      table[V * C + c] = table[(V + 1) * C + c] = static_cast<T>(mean);
    }
    std::copy(table.begin() + spec.split_begin * C, table.begin() + spec.split_begin * C + spec.size,
              dst);
  }
  return grown;
}

template LomaLosses LomaZoneLosses<float>(const float*, const int32_t*, int, int,
                                          const kernels::LomaZones&, std::vector<double>*);
template LomaLosses LomaZoneLosses<double>(const double*, const int32_t*, int, int,
                                           const kernels::LomaZones&, std::vector<double>*);
template std::unique_ptr<Llama<float>> AddLomaTokens(const Llama<float>&, parallel::Communicator*,
                                                     const kernels::LomaZones&);
template std::unique_ptr<Llama<double>> AddLomaTokens(const Llama<double>&,
                                                      parallel::Communicator*,
                                                      const kernels::LomaZones&);

}  // namespace dmc::model
