// The paged KV cache (model/DMC.md §6): fixed-size pages of `page_size` slots from a PageAllocator over a
// byte budget, and a page table per (sequence, layer, KV head), so every head has its own length.
//
// What a head holds depends on the method (inference/cache_policy.h):
//   DMC       AddDmc appends a slot (alpha = 0, and always for the first token) or accumulates
//             the token into the open slot (alpha = 1); the open slot is the omega-weighted mean
//             of its DmcWindow, which the caller rotates at the newest token's position.
//   vanilla, H2O, TOVA   Append adds the rotated key and the value as a slot; the eviction
//             baselines then Evict slots. Eviction moves the last slot into the hole (attention
//             does not care about slot order; each slot remembers its token position), and a
//             page that empties returns to the allocator at once.
// Every slot also carries a score (H2O's accumulated attention). A head is used either the DMC
// way or the append/evict way: the window state belongs to the slot AddDmc last opened.
//
// Quantized (options.quant.bits > 0; kernels/kv_quant.h, KIVI and ZipCache): pages hold b-bit
// codes with their scales and zero points, one page per page_size slots (the key's per-channel
// group). A head's slots are [0, quantized) in pages, then the residual at full precision (T) in
// a block of its own: the slots that may still change or leave (DMC's open slot, whose window
// state stays full precision; DMS's tokens not yet past its eviction window, settle_lag) and, per
// channel, the settled ones waiting for a page to fill. A slot settles when a token more than
// settle_lag positions newer arrives. Keys per channel: every page_size settled slots are
// quantized into a page at once (ZipCache: the salient_slots with the highest normalized
// attention score, score / queries that saw the slot, go to the page's high-precision rows), so
// quantized pages are full. Keys per token (quant.token_keys): a page's rows are independent, so
// each slot is quantized into the next row of the head's last page as soon as it settles (a new
// page when that one is full), oldest first, and the residual holds settle_lag + 1 slots.
// Quantized slots are never moved or evicted, so eviction baselines (H2O, TOVA) refuse a
// quantized cache.
//
// ThinK (options.think_channels > 0; kernels/think_channels.h, arXiv 2407.21018): the same
// residual, settling as above (so DMC's open slot and DMS's window stay whole), and pages of
// page_size settled slots whose keys keep only think_channels channels, chosen for that page by
// the query-driven score of its keys and of the queries observed since the head's previous page
// (ObserveQuery: their energy per channel, summed over the query heads of the KV head, a D-vector
// per head reserved at admission); the values stay whole. A page stores its pruned keys
// [page_size, think_channels], its values and its channel mask.
//
// Memory: a page is page_size × (key + value) × head_dim × sizeof(T) bytes (quantized: the
// layout's bytes); DMC sequences also reserve their window ring buffers (DmcWindow::Bytes per
// head) at admission, quantized sequences their residual blocks. Admission
// (AddSequence) and every step's worst-case growth (CanStep) are checked against the budget
// before anything changes, so running out is a clear absl error and never a half-done step.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "inference/dmc_window.h"
#include "inference/page_allocator.h"
#include "kernels/kv_quant.h"
#include "kernels/think_channels.h"

namespace dmc::inference {

struct PagedCacheOptions {
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int page_size = 16;      // slots per page
  long budget_bytes = 0;   // pages and window state together
  int dmc_window = 0;      // w of the DMC window state; 0: no window (the baselines)
  kernels::KvQuantOptions quant = {};  // bits 0: pages hold T
  int settle_lag = 0;  // quantized: positions a slot may still change or leave after (DMS: w + 1)
  int think_channels = 0;  // ThinK: key channels a page keeps; 0: pages keep every channel
};

inline bool KvQuantized(const PagedCacheOptions& o) { return o.quant.bits > 0; }
inline bool KvThink(const PagedCacheOptions& o) { return o.think_channels > 0; }
// Whether settled slots are written into compressed pages (quantized or ThinK-pruned), the
// newest ones waiting in a full-precision residual.
inline bool KvSettles(const PagedCacheOptions& o) { return KvQuantized(o) || KvThink(o); }
// Whether each slot is quantized as it settles (per-token keys), not a page of them at once.
inline bool KvSettlesSlots(const PagedCacheOptions& o) {
  return KvQuantized(o) && o.quant.token_keys;
}
// Slots a settling head holds at full precision at most: the 1 + settle_lag newest ones, and
// (a page at a time) page_size − 1 settled ones waiting for their page.
inline int KvResidualSlots(const PagedCacheOptions& o) {
  return o.settle_lag + (KvSettlesSlots(o) ? 1 : o.page_size);
}

// What the cache charges, as functions of its options and element sizes alone, so that a path
// which only counts slots (the GPU evaluation, inference/evaluate_cuda.h) or keeps the cache
// elsewhere (the GPU engine: bf16 pages and window keys and values, fp32 importances) reports
// exactly what this cache would hold at that precision.
// One page: page_size slots of a key and a value row of head_dim elements (quantized: codes,
// scales and zero points, kernels/kv_quant.h; ThinK: the kept key channels, the whole values and
// the channel mask).
inline long KvPageBytes(const PagedCacheOptions& o, int element_bytes) {
  if (KvQuantized(o)) return kernels::kv_quant_page_layout(o.quant, o.page_size, o.head_dim).bytes;
  if (KvThink(o))
    return static_cast<long>(o.page_size) * (o.think_channels + o.head_dim) * element_bytes +
           kernels::ThinkMaskBytes(o.head_dim);
  return static_cast<long>(std::max(1, o.page_size)) * 2 * o.head_dim * element_bytes;
}
// The window state a DMC sequence reserves at admission: a ring buffer per (layer, KV head) of raw
// keys and values at the pages' width (the engine's activations: T on the CPU, bf16 on the GPU)
// and importances at the state's width.
inline long KvWindowBytes(const PagedCacheOptions& o, int page_element_bytes,
                          int state_element_bytes) {
  if (o.dmc_window <= 0) return 0;
  return static_cast<long>(o.layers) * o.kv_heads *
         DmcWindowBytes(o.dmc_window, o.head_dim, page_element_bytes, state_element_bytes);
}
// The residual blocks a settling sequence reserves at admission: one per (layer, KV head).
inline long KvResidualBytes(const PagedCacheOptions& o, int element_bytes) {
  if (!KvSettles(o)) return 0;
  return static_cast<long>(o.layers) * o.kv_heads * KvResidualSlots(o) * 2 * o.head_dim *
         element_bytes;
}
// ThinK's observed query energy [D] per (layer, KV head), reserved at admission. A running sum,
// it is kept at the state's width (fp32 on the GPU engine, whose pages are bf16).
inline long KvObservationBytes(const PagedCacheOptions& o, int element_bytes) {
  if (!KvThink(o)) return 0;
  return static_cast<long>(o.layers) * o.kv_heads * o.head_dim * element_bytes;
}
// Everything a sequence reserves at admission, beside its pages.
inline long KvReservedBytes(const PagedCacheOptions& o, int page_element_bytes,
                            int state_element_bytes) {
  return KvWindowBytes(o, page_element_bytes, state_element_bytes) +
         KvResidualBytes(o, page_element_bytes) +
         KvObservationBytes(o, state_element_bytes);
}
// One sequence whose heads [layer, KV head] hold head_slots slots: ceil(slots / page_size) pages
// per head (a head opens a page only when its last one is full, and frees one when it empties)
// plus its window state. Settling (quantized, ThinK): every slot but the newest has settled
// (exact for vanilla and DMC, a bound for DMS, which settles later), in (slots − 1) / page_size
// pages per head, or ceil((slots − 1) / page_size) a slot at a time, plus the reservations
// (window state, residual blocks, ThinK's query energy).
inline long KvSequenceBytes(const PagedCacheOptions& o, const std::vector<int>& head_slots,
                            int page_element_bytes, int state_element_bytes) {
  const long page = std::max(1, o.page_size);
  long pages = 0;
  for (int slots : head_slots) {
    const long settled = std::max(0, slots - 1);
    pages += KvSettlesSlots(o) ? (settled + page - 1) / page
             : KvSettles(o)    ? settled / page
                               : (slots + page - 1) / page;
  }
  return pages * KvPageBytes(o, page_element_bytes) +
         KvReservedBytes(o, page_element_bytes, state_element_bytes);
}
// The CPU cache of element type T (pages and window state both T).
template <typename T>
long KvPageBytes(const PagedCacheOptions& o) {
  return KvPageBytes(o, sizeof(T));
}
template <typename T>
long KvWindowBytes(const PagedCacheOptions& o) {
  return KvWindowBytes(o, sizeof(T), sizeof(T));
}
template <typename T>
long KvSequenceBytes(const PagedCacheOptions& o, const std::vector<int>& head_slots) {
  return KvSequenceBytes(o, head_slots, sizeof(T), sizeof(T));
}

template <typename T>
class PagedKvCache {
 public:
  explicit PagedKvCache(const PagedCacheOptions& options);
  const PagedCacheOptions& options() const { return opt_; }

  // Admits sequence `seq` (an id not in the cache): reserves its window state (and residual
  // blocks) and checks that its first token fits (one page per head; quantized: none). ResourceExhausted when the budget refuses it.
  absl::Status AddSequence(int seq);
  // Returns every page and reservation of `seq` to the allocator.
  absl::Status Free(int seq);
  bool contains(int seq) const { return seqs_.count(seq) > 0; }
  int num_sequences() const { return static_cast<int>(seqs_.size()); }

  // Pages that one more token of each of `seqs` may need at worst (every head whose last page is
  // full, or that has none, opens a page), and whether the budget holds them.
  long PagesForStep(const std::vector<int>& seqs) const;
  // Pages that n more tokens of `seq` may need at worst (every token opens a slot in every head).
  long PagesForTokens(int seq, int n) const;
  absl::Status CanStep(const std::vector<int>& seqs) const;

  // Adds a slot holding (key, value) of the token at `position` (settling: first settles the
  // slots it leaves behind, which may fill a page or, per-token keys, open one).
  absl::Status Append(int seq, int layer, int h, const T* key, const T* value, int32_t position);
  // DMC: appends (merge = false, or an empty head) or accumulates into the open slot; returns the
  // open slot's key row, which holds the pre-RoPE mean and must be rotated by the caller.
  absl::StatusOr<T*> AddDmc(int seq, int layer, int h, const T* key, const T* value, T omega,
                            bool merge, int32_t position);
  // Removes slot `slot` of a head (the last slot moves into its place); settling: only a slot of
  // the residual (FailedPrecondition for one in a compressed page).
  absl::Status Evict(int seq, int layer, int h, int slot);
  // Removes slots [first, first + count) of a head, the later ones moving down in order, and
  // returns the pages left empty (LoMA's compression drops a segment lying between the memory
  // slots and its new ones). Not on a settling cache, whose pages never move (FailedPrecondition).
  absl::Status Remove(int seq, int layer, int h, int first, int count);

  // Tokens fed so far to `seq` (its next position); advanced by the decoder after a step.
  int tokens(int seq) const { return seq_at(seq).tokens; }
  void AdvanceToken(int seq) { ++seqs_.at(seq).tokens; }

  int length(int seq, int layer, int h) const { return head(seq, layer, h).length; }
  int32_t position(int seq, int layer, int h, int slot) const {
    return head(seq, layer, h).positions[slot];
  }
  float& score(int seq, int layer, int h, int slot) { return head(seq, layer, h).scores[slot]; }
  // The key and value of one slot (dequantized when it is in a quantized page; a ThinK page's
  // pruned channels read 0).
  void ReadSlot(int seq, int layer, int h, int slot, T* key, T* value) const;
  // Slots of head (layer, h) of `seq` in compressed pages (the first ones).
  int compressed_length(int seq, int layer, int h) const { return head(seq, layer, h).compressed; }
  // ThinK: adds the energy per channel of the rotated queries q [H, D] of `seq`'s newest token in
  // `layer` to each KV head's observation (the query heads of its group). exclude_ctrl: channel
  // D-1 is DMC's control channel, which attention never reads; it gets no energy, so it scores 0
  // and takes a kept channel's place only when fewer than think_channels channels score above 0.
  void ObserveQuery(int seq, int layer, const T* q, int H, bool exclude_ctrl);

  // The block table of `seqs` at `layer` for kernels::paged_decode_attention: lengths [n, Hkv],
  // page_table [n, Hkv, *max_pages].
  void BlockTable(const std::vector<int>& seqs, int layer, std::vector<int32_t>* page_table,
                  std::vector<int>* lengths, int* max_pages) const;
  const T* k_pool() const { return k_pool_.data(); }
  const T* v_pool() const { return v_pool_.data(); }
  // Settling: BlockTable gives the compressed slots and their pages; ResidualTable the residual
  // block and length [n, Hkv] of each head, rows in r_k_pool() / r_v_pool() [blocks,
  // KvResidualSlots, D] (kernels/decode_attention.h). Quantized pages are in q_pool(), of
  // quant_layout().bytes each; ThinK pages are rows of k_pool() [pages, page_size,
  // think_channels] and v_pool() [pages, page_size, D], with masks in mask_pool().
  void ResidualTable(const std::vector<int>& seqs, int layer, std::vector<int32_t>* blocks,
                     std::vector<int>* lengths) const;
  const kernels::KvQuantPageLayout& quant_layout() const { return layout_; }
  const uint8_t* q_pool() const { return q_pool_.data(); }
  const uint8_t* mask_pool() const { return mask_pool_.data(); }
  const T* r_k_pool() const { return r_k_pool_.data(); }
  const T* r_v_pool() const { return r_v_pool_.data(); }

  // Slots of one sequence / of all sequences, over layers and heads.
  long total_slots(int seq) const;
  long total_slots() const;
  const PageAllocator& allocator() const { return alloc_; }
  long page_bytes() const { return alloc_.page_bytes(); }
  // Bytes of one sequence: its pages and its reservations.
  long bytes(int seq) const;

 private:
  struct Head {
    std::vector<int32_t> pages;
    std::vector<int32_t> positions;  // token position of each slot
    std::vector<float> scores;
    int length = 0;
    DmcWindow<T> window;
    int compressed = 0;  // settling: slots in pages; the rest are rows of the residual block
    int32_t block = -1;  // settling: the residual block
    std::vector<T> query_energy;  // ThinK: Σ q_j² of the queries since the head's last page
  };
  struct Sequence {
    std::vector<Head> heads;  // [layer, KV head]
    int tokens = 0;
  };
  const Sequence& seq_at(int seq) const { return seqs_.at(seq); }
  Head& head(int seq, int layer, int h) {
    return seqs_.at(seq).heads[static_cast<size_t>(layer) * opt_.kv_heads + h];
  }
  const Head& head(int seq, int layer, int h) const {
    return seqs_.at(seq).heads[static_cast<size_t>(layer) * opt_.kv_heads + h];
  }
  // The full-precision key row of a slot: in the pool, or (settling) in the residual block; the
  // value row is at the same offset of the value pool.
  long row(const Head& hd, int slot) const {
    if (KvSettles(opt_))
      return static_cast<long>(hd.block) * KvResidualSlots(opt_) + slot - hd.compressed;
    return static_cast<long>(hd.pages[slot / opt_.page_size]) * opt_.page_size +
           slot % opt_.page_size;
  }
  T* key_row(const Head& hd, int slot) {
    return (KvSettles(opt_) ? r_k_pool_ : k_pool_).data() + row(hd, slot) * opt_.head_dim;
  }
  T* value_row(const Head& hd, int slot) {
    return (KvSettles(opt_) ? r_v_pool_ : v_pool_).data() + row(hd, slot) * opt_.head_dim;
  }
  // Opens a new slot at the end of a head (a new page when the last one is full; settling: in
  // the residual, after settling); returns its index.
  absl::StatusOr<int> NewSlot(Head& hd, int32_t position);
  // Settling: settles the residual slots older than position − settle_lag and writes every
  // page_size of them into a compressed page (per-token keys: each into the next row).
  absl::Status Settle(Head& hd, int32_t position);
  // Writes keys and values [page_size, D] into a new page of the head (quantized or
  // ThinK-pruned).
  absl::Status WritePage(Head& hd, const std::vector<T>& keys, const std::vector<T>& values);
  // Per-token keys: quantizes keys and values [n, D] into the rows after the head's compressed
  // slots, opening a page whenever its last one is full.
  absl::Status WriteRows(Head& hd, const std::vector<T>& keys, const std::vector<T>& values);
  // Quantized: grows q_pool_ to the pages the allocator has handed out.
  void GrowQuantPool();
  long reserved_bytes() const { return KvReservedBytes(opt_, sizeof(T), sizeof(T)); }

  PagedCacheOptions opt_;
  PageAllocator alloc_;
  std::vector<T> k_pool_, v_pool_;  // [alloc_.high_water(), page_size, D] (ThinK keys: kept)
  kernels::KvQuantPageLayout layout_;
  std::vector<uint8_t> q_pool_;         // quantized: [alloc_.high_water(), layout_.bytes]
  std::vector<uint8_t> mask_pool_;      // ThinK: [alloc_.high_water(), ThinkMaskBytes(D)]
  std::vector<T> r_k_pool_, r_v_pool_;  // settling: [blocks, KvResidualSlots, D]
  std::vector<int32_t> free_blocks_;    // residual blocks of freed sequences
  int32_t blocks_ = 0;                  // residual blocks ever handed out
  std::map<int, Sequence> seqs_;
};

}  // namespace dmc::inference
