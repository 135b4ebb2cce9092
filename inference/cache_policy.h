// What the KV cache keeps, per method, all in the same paged cache (H2O: Zhang et al., NeurIPS 2023; TOVA: Oren et al., 2024; LoMA: model/README.md):
//   dmc      the learned per-head append/accumulate decisions (model/DMC.md §6); no budget.
//   dms      a DMS model's learned delayed eviction (model/DMS.md §5): every token appends its
//            rotated
//            key; token t's decision d_t marks token t-1 (the slot's score holds the mark), and a
//            marked token leaves its head when it falls out of the window, at step t-1+w+1, before
//            that step's attention — the hard mask of the training forward. No budget. The GPU
//            engine applies the same rule to its flat device cache with
//            kernels/paged_kv_dms_evict.h.
//   vanilla  every token appends: the full cache (CR 1).
//   h2o      Heavy-Hitter Oracle, head-wise: every slot of a KV head accumulates the attention it
//            receives from each query (summed over the query heads of its GQA group); after the
//            attention of step t, while a head holds more than `budget` slots, the slot with the
//            lowest accumulated score among those outside the recent window (positions
//            <= t − recent) is evicted. Budget = heavy hitters + recent, split 50/50 by default.
//   tova     Token Omission Via Attention, layer-wise: after the attention of step t, while the
//            layer holds more than `budget` slots, the token with the lowest attention of the
//            current query averaged over all query heads of the layer is evicted from every KV
//            head (one shared token set per layer; no window, no sinks). Memoryless.
// Both evict every step, the prompt included (every token is fed one by one), ties going to the
// oldest token. Keys are cached rotated at their true positions (no re-indexing). The GPU engine
// applies the same rules to its flat device cache with kernels/paged_kv_evict.h.
//   loma     a LoMA-retrofitted model (config.loma): every t·c tokens the t <m> tokens run over
//            the head's slots and their KVs replace the segment's (inference/paged_decoder.h).
// KV quantization (policy.quant, inference/paged_kv_cache.h, kernels/kv_quant.h) stores the
// vanilla, dmc or dms cache in b-bit pages: KIVI's granularity (keys per channel over a page,
// values per token), settled slots only (DMC's window state and open slot, and DMS's tokens
// still inside its eviction window, stay full precision), a page of them at once. With
// quant.token_keys the keys too are quantized per token (groups of quant.key_group channels,
// the whole head when 0), and each slot is quantized as soon as it settles, so only the slots
// that may still change or leave stay at full precision. ZipCache's mixed precision
// (quant.salient_slots > 0, vanilla only): every slot accumulates the attention it receives, as
// H2O's score (summed over the query heads of its KV head), and the page_size slots quantized
// together keep their salient_slots highest normalized scores (accumulated attention / queries
// that saw the slot) at salient_bits.
// ThinK (policy.think_channels > 0; arXiv 2407.21018, kernels/think_channels.h): the vanilla,
// dmc or dms cache at full precision whose settled pages keep think_channels key channels per
// head, chosen per page by the query-driven score; attention reads the kept channels of those
// pages. Slots settle as for quantization: DMC's once closed, DMS's once past the eviction window.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/paged_kv_cache.h"

namespace dmc::inference {

enum class CacheMethod { kDmc, kDms, kVanilla, kH2O, kTova, kLoma };
// How h2o and tova spread their slots over layers (inference/layer_budgets.h).
enum class LayerAllocation { kUniform, kPyramidInfer, kZigZag };

absl::StatusOr<CacheMethod> ParseCacheMethod(std::string_view name);
const char* CacheMethodName(CacheMethod method);

struct CachePolicy {
  CacheMethod method = CacheMethod::kDmc;
  int budget = 0;  // h2o, tova: slots per KV head (tova: per layer, shared by its heads)
  int recent = 0;  // h2o: the recent window, part of the budget
  kernels::KvQuantOptions quant = {};  // bits 0: full precision
  int think_channels = 0;  // ThinK: key channels kept per page; 0: every channel
  // h2o, tova: the budget of each layer, as `budget` is of every layer when empty (h2o's recent
  // window: half of it, rounded down), and the rule that set them.
  std::vector<int> layer_budget = {};
  LayerAllocation allocation = LayerAllocation::kUniform;
  // KVSharer (vanilla only): the layer whose cache each layer's attention reads; a layer that
  // reads an earlier one's stores nothing. Empty: every layer its own.
  std::vector<int> kv_source = {};
};

int KvSourceLayer(const CachePolicy& policy, int layer);
// Whether policy.kv_source is valid for a model of `layers` layers: empty, or one entry per
// layer, each the layer itself or an earlier layer that reads its own cache, on the
// full-precision vanilla cache. InvalidArgument naming the problem.
absl::Status ValidateKvSharing(const CachePolicy& policy, int layers);

// What the byte budgets of the calibrated methods need: ZigZagKV's LMBA per layer
// (inference/layer_budgets.h) and KVSharer's accepted (layer, source) pairs in the order its
// search accepted them (inference/kv_sharer.h).
struct LayerCalibration {
  std::vector<double> lmba;
  std::vector<std::pair<int, int>> shared;
};

// The budget and h2o's recent window at `layer`.
int LayerBudget(const CachePolicy& policy, int layer);
int LayerRecent(const CachePolicy& policy, int layer);
// Whether h2o's and tova's budgets are valid for a model of `layers` layers: policy.layer_budget
// empty or one per layer, and every layer's budget >= 1 with its recent window in [0, budget).
// OK for the other methods. InvalidArgument naming the problem and the layer.
absl::Status ValidateEvictionBudgets(const CachePolicy& policy, int layers);

// The policy's name in results, one per setting: the method, "-pyramid" or "-zigzag" for per-layer
// budgets, its (mean) slots per head for h2o and tova ("h2o-32", "h2o-pyramid-32"), then "-int8"
// for KV quantization, "-int8-token" with per-token keys ("-int8-token-g32": key groups of 32
// channels), "-zip4/2x6" for ZipCache's mixed precision (salient bits / bits, salient slots per
// page); "think-k24" for ThinK keeping 24 key channels of the vanilla cache,
// "dmc-think-k24" and "dms-think-k24" of the dmc and dms caches; "kvsharer-2" for 2 layers
// reading another's cache.
std::string PolicyName(const CachePolicy& policy);

// Whether policy.quant is a valid quantization of `method`'s cache of head dimension head_dim
// in pages of page_size: bits 2, 4 or 8 (head_dim · bits a whole number of bytes), value_group
// dividing head_dim; per-token keys only on a quantized cache, key_group (only with them)
// dividing head_dim; salient_slots in [0, page_size] at salient_bits 4 or 8 above bits, for
// vanilla only and not with per-token keys. InvalidArgument naming the problem.
absl::Status ValidateKvQuant(const CachePolicy& policy, int head_dim, int page_size);
// Either engine's page size: one slot at least.
absl::Status ValidatePageSize(int page_size);
// Whether the GPU engine (inference/cuda_engine.h) serves policy.quant: not per-token keys on the
// dms cache, whose slots it settles a page at a time past the eviction window (the CPU engine
// serves every valid setting).
// InvalidArgument naming the policy. Here, not in the GPU engine, so that a budget plan for
// it (PolicyForBytes) and a build without CUDA know it too.
absl::Status ValidateGpuKvQuant(const CachePolicy& policy);
// Whether policy.think_channels is valid for head dimension head_dim: 0, or 1 to head_dim on the
// vanilla, dmc or dms cache at full precision. InvalidArgument naming the problem.
absl::Status ValidateThink(const CachePolicy& policy, int head_dim);

// The cache that a method name of PolicyForBytes decodes with: a cache method's own, and for the
// names it takes beside them "quant", "zipcache", "think", "kvsharer" the vanilla cache,
// "h2o_pyramid", "h2o_zigzag" h2o's, "tova_pyramid", "tova_zigzag" tova's, "dmc_think" dmc's and
// "dms_think" dms's. InvalidArgument for an unknown name.
absl::StatusOr<CacheMethod> BudgetCacheMethod(std::string_view name);

// The eviction baselines' budget matched to a compression ratio over sequences of seq_len tokens:
// budget = ceil(seq_len / cr) slots per head (CR = tokens / KV length), h2o's recent window half
// of it (rounded down, so at least one heavy hitter).
absl::StatusOr<CachePolicy> PolicyForCr(CacheMethod method, int seq_len, double cr);

// The policy of `method` whose cache meets a byte budget per sequence of seq_len tokens, by
// KvSequenceBytes at the engine's widths (DecodeEngine::element_bytes and state_element_bytes:
// pages, the full-precision residual and DMC's windowed keys and values at page_element_bytes,
// DMC's importances and ThinK's query energy at state_element_bytes; shape: the method's cache options, settle_lag as its
// quantized or ThinK cache would have it), with
// the knob that compresses least: vanilla has none; "quant" (the vanilla cache quantized) 8, 4
// or 2 bits; "zipcache" the most salient slots per page of 8-bit salient over 4-bit slots, else
// of 4 over 2 bits (1 to page_size − 1: every mixture, none of its ends); "think" the most key
// channels kept (head_dim to 1; keys only, so never below half of vanilla); h2o and tova the most
// slots per head; their _pyramid and _zigzag variants the largest mean budget per layer whose
// per-layer budgets meet it (zigzag: from calibration.lmba); "kvsharer" the fewest shared layers,
// the first pairs of calibration.shared; dmc and dms, whose CR
// the model learned, full precision or 8, 4, 2 bits over head_slots (their slots per (layer, KV
// head) measured at full precision), at each bits keys per channel and then per token (a
// smaller residual); "dmc_think" and "dms_think" the most key channels kept over
// head_slots. InvalidArgument when no setting of the knob meets the
// budget, naming the smallest cache it reaches and its bytes in pages and in what a sequence
// reserves: full-precision residual, DMC window state, ThinK's query energy. gpu: only the
// settings the GPU engine serves (ValidateGpuKvQuant).
absl::StatusOr<CachePolicy> PolicyForBytes(std::string_view method,
                                           const PagedCacheOptions& shape,
                                           int page_element_bytes, int state_element_bytes,
                                           int seq_len, long budget_bytes,
                                           const std::vector<int>& head_slots,
                                           const LayerCalibration& calibration = {},
                                           bool gpu = false);

// After the attention of the token at position t of sequence seq in `layer`: probs are its
// attention weights, probs[g · probs_stride + i] for query head g and slot i
// (kernels::paged_decode_attention's layout for one sequence). AccumulateAttention adds to every
// slot's score the attention it received from the query heads of its KV head (H2O's score,
// ZipCache's accumulated attention); H2OUpdate does that and evicts, TovaUpdate evicts.
template <typename T>
void AccumulateAttention(PagedKvCache<T>& cache, int seq, int layer, const T* probs,
                         int probs_stride, int H);
template <typename T>
absl::Status H2OUpdate(PagedKvCache<T>& cache, int seq, int layer, int t, const T* probs,
                       int probs_stride, int H, const CachePolicy& policy);
template <typename T>
absl::Status TovaUpdate(PagedKvCache<T>& cache, int seq, int layer, const T* probs,
                        int probs_stride, int H, const CachePolicy& policy);

// DMS, after token t of sequence seq has been appended to head (layer, h) and before its
// attention: marks token t-1 when evict_previous (d_t = 1), then evicts token t-window-1 if it is
// marked, returning its slot (and, when a page empties, the page) to the cache.
template <typename T>
absl::Status DmsUpdate(PagedKvCache<T>& cache, int seq, int layer, int h, int t,
                       bool evict_previous, int window);

}  // namespace dmc::inference
