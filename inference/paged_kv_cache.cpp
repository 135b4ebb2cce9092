#include "inference/paged_kv_cache.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "kernels/paged_kv_pages.h"

namespace dmc::inference {

template <typename T>
PagedKvCache<T>::PagedKvCache(const PagedCacheOptions& options)
    : opt_(options),
      alloc_(options.budget_bytes, KvPageBytes<T>(options)),
      layout_(KvQuantized(options) ? kernels::kv_quant_page_layout(options.quant, options.page_size,
                                                                   options.head_dim)
                                   : kernels::KvQuantPageLayout{}) {}

template <typename T>
absl::Status PagedKvCache<T>::AddSequence(int seq) {
  if (seqs_.count(seq))
    return absl::AlreadyExistsError(absl::StrFormat("sequence %d is already in the cache", seq));
  const long heads = static_cast<long>(opt_.layers) * opt_.kv_heads;
  const long first_pages = KvSettles(opt_) ? 0 : heads;  // settling: the residual holds it
  const long need = reserved_bytes() + first_pages * alloc_.page_bytes();
  if (need > alloc_.free_bytes())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache budget of %d bytes cannot admit sequence %d: its first token needs %d bytes "
        "(%d pages of %d bytes%s), %d of %d bytes are in use by %d sequences",
        alloc_.budget_bytes(), seq, need, first_pages, alloc_.page_bytes(),
        reserved_bytes() ? absl::StrFormat(", %d bytes of window state, residual and ThinK "
                                           "observation",
                                           reserved_bytes())
                         : "",
        alloc_.used_bytes(), alloc_.budget_bytes(), num_sequences()));
  if (absl::Status s = alloc_.Reserve(reserved_bytes()); !s.ok()) return s;
  Sequence& sq = seqs_[seq];
  sq.heads.resize(heads);
  for (Head& hd : sq.heads) {
    if (opt_.dmc_window > 0) hd.window = DmcWindow<T>(opt_.dmc_window, opt_.head_dim);
    if (KvThink(opt_)) hd.query_energy.assign(opt_.head_dim, T(0));
    if (!KvSettles(opt_)) continue;
    if (free_blocks_.empty()) {
      free_blocks_.push_back(blocks_++);
      const size_t pool = static_cast<size_t>(blocks_) * KvResidualSlots(opt_) * opt_.head_dim;
      r_k_pool_.resize(pool);
      r_v_pool_.resize(pool);
    }
    hd.block = free_blocks_.back();
    free_blocks_.pop_back();
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status PagedKvCache<T>::Free(int seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    return absl::NotFoundError(absl::StrFormat("free of sequence %d, which is not in the cache", seq));
  for (const Head& hd : it->second.heads) {
    for (int32_t page : hd.pages)
      if (absl::Status s = alloc_.Free(page); !s.ok()) return s;
    if (hd.block >= 0) free_blocks_.push_back(hd.block);
  }
  if (absl::Status s = alloc_.Release(reserved_bytes()); !s.ok()) return s;
  seqs_.erase(it);
  return absl::OkStatus();
}

template <typename T>
long PagedKvCache<T>::PagesForStep(const std::vector<int>& seqs) const {
  long pages = 0;
  for (int seq : seqs) pages += PagesForTokens(seq, 1);
  return pages;
}

template <typename T>
long PagedKvCache<T>::PagesForTokens(int seq, int n) const {
  const int P = opt_.page_size;
  long pages = 0;
  // kernels/paged_kv_pages.h states the count (the GPU engine's page bookkeeping uses it too);
  // settling, the pages beyond the settled ones it holds, else beyond the pages it has.
  const bool settles = KvSettles(opt_);
  const bool slots = KvSettlesSlots(opt_);
  for (const Head& hd : seq_at(seq).heads) {
    const int residual = settles ? hd.length - hd.compressed : hd.length;
    const int settled = settles ? hd.compressed : 0;
    const long held = slots     ? kernels::KvSlotPagesKept(settled, P)
                      : settles ? kernels::KvPagesKept(residual, settled, P, true)
                                : static_cast<long>(hd.pages.size());
    const long grow = slots ? kernels::KvSlotPagesToGrow(residual, settled, n, P)
                            : kernels::KvPagesToGrow(residual, settled, n, P, settles);
    pages += std::max(0L, grow - held);
  }
  return pages;
}

template <typename T>
absl::Status PagedKvCache<T>::CanStep(const std::vector<int>& seqs) const {
  const long pages = PagesForStep(seqs);
  if (pages > alloc_.free_pages())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache budget of %d bytes exhausted: the next token of %d sequences may need %d new "
        "pages of %d bytes, only %d are free",
        alloc_.budget_bytes(), seqs.size(), pages, alloc_.page_bytes(), alloc_.free_pages()));
  return absl::OkStatus();
}

template <typename T>
absl::Status PagedKvCache<T>::Settle(Head& hd, int32_t position) {
  const int P = opt_.page_size, D = opt_.head_dim, S = layout_.salient_slots;
  const bool slots = KvSettlesSlots(opt_);
  for (;;) {
    std::vector<int> settled;  // residual slots that can no longer change or leave
    for (int i = hd.compressed; i < hd.length; ++i)
      if (hd.positions[i] < position - opt_.settle_lag) settled.push_back(i);
    // A page at a time: the oldest page_size; a slot at a time: every one.
    const int take = slots ? static_cast<int>(settled.size()) : P;
    if (take == 0 || static_cast<int>(settled.size()) < take) return absl::OkStatus();
    std::sort(settled.begin(), settled.end(),
              [&](int a, int b) { return hd.positions[a] < hd.positions[b]; });
    settled.resize(take);
    // ZipCache's salient ones go first, to the high-precision rows. Normalized attention score:
    // accumulated attention / queries that saw the slot (tokens pos .. position − 1), ties to
    // the older slot.
    if (S > 0) {
      auto saliency = [&](int i) {
        return static_cast<double>(hd.scores[i]) / (position - hd.positions[i]);
      };
      std::stable_sort(settled.begin(), settled.end(),
                       [&](int a, int b) { return saliency(a) > saliency(b); });
    }
    std::vector<T> keys(static_cast<size_t>(take) * D), values(keys.size());
    for (int r = 0; r < take; ++r) {
      std::copy_n(key_row(hd, settled[r]), D, keys.begin() + static_cast<long>(r) * D);
      std::copy_n(value_row(hd, settled[r]), D, values.begin() + static_cast<long>(r) * D);
    }
    if (absl::Status s = slots ? WriteRows(hd, keys, values) : WritePage(hd, keys, values); !s.ok())
      return s;
    // New slot order: the settled slots, then the rest of the residual as it was.
    std::vector<int> order(settled);
    std::vector<bool> taken(hd.length, false);
    for (int i : settled) taken[i] = true;
    for (int i = hd.compressed; i < hd.length; ++i)
      if (!taken[i]) order.push_back(i);
    std::vector<T> rest_k, rest_v;
    for (size_t j = take; j < order.size(); ++j) {
      rest_k.insert(rest_k.end(), key_row(hd, order[j]), key_row(hd, order[j]) + D);
      rest_v.insert(rest_v.end(), value_row(hd, order[j]), value_row(hd, order[j]) + D);
    }
    std::vector<int32_t> positions(hd.positions.begin(), hd.positions.begin() + hd.compressed);
    std::vector<float> scores(hd.scores.begin(), hd.scores.begin() + hd.compressed);
    for (int i : order) {
      positions.push_back(hd.positions[i]);
      scores.push_back(hd.scores[i]);
    }
    hd.positions = std::move(positions);
    hd.scores = std::move(scores);
    hd.compressed += take;
    std::copy(rest_k.begin(), rest_k.end(), key_row(hd, hd.compressed));
    std::copy(rest_v.begin(), rest_v.end(), value_row(hd, hd.compressed));
  }
}

template <typename T>
absl::Status PagedKvCache<T>::WriteRows(Head& hd, const std::vector<T>& keys,
                                        const std::vector<T>& values) {
  const int P = opt_.page_size, D = opt_.head_dim;
  for (size_t r = 0; r * D < keys.size(); ++r) {
    const int slot = hd.compressed + static_cast<int>(r);
    if (slot % P == 0) {  // the head's last page is full (or it has none)
      absl::StatusOr<int32_t> page = alloc_.Allocate();
      if (!page.ok()) return page.status();
      hd.pages.push_back(*page);
      GrowQuantPool();
    }
    kernels::kv_quantize_row(q_pool_.data() + static_cast<long>(hd.pages.back()) * layout_.bytes,
                             layout_, slot % P, keys.data() + r * D, values.data() + r * D);
  }
  return absl::OkStatus();
}

template <typename T>
void PagedKvCache<T>::GrowQuantPool() {
  const size_t bytes = static_cast<size_t>(alloc_.high_water()) * layout_.bytes;
  if (q_pool_.size() < bytes) q_pool_.resize(bytes);
}

template <typename T>
absl::Status PagedKvCache<T>::WritePage(Head& hd, const std::vector<T>& keys,
                                        const std::vector<T>& values) {
  absl::StatusOr<int32_t> allocated = alloc_.Allocate();
  if (!allocated.ok()) return allocated.status();
  const int32_t page = *allocated;
  hd.pages.push_back(page);
  const size_t pages = alloc_.high_water();
  if (KvQuantized(opt_)) {
    GrowQuantPool();
    kernels::kv_quantize_page(q_pool_.data() + static_cast<long>(page) * layout_.bytes, layout_,
                              keys.data(), values.data());
    return absl::OkStatus();
  }
  const int P = opt_.page_size, D = opt_.head_dim, K = opt_.think_channels;
  const int mask_bytes = kernels::ThinkMaskBytes(D);
  if (mask_pool_.size() < pages * mask_bytes) {
    k_pool_.resize(pages * P * K);
    v_pool_.resize(pages * P * D);
    mask_pool_.resize(pages * mask_bytes);
  }
  uint8_t* mask = mask_pool_.data() + static_cast<long>(page) * mask_bytes;
  kernels::think_select_channels(mask, hd.query_energy.data(), keys.data(), P, D, K);
  kernels::think_prune_rows(k_pool_.data() + static_cast<long>(page) * P * K, keys.data(), mask, P,
                            D, K);
  std::copy(values.begin(), values.end(), v_pool_.begin() + static_cast<long>(page) * P * D);
  // The next page is scored by the queries that come after this one was written.
  std::fill(hd.query_energy.begin(), hd.query_energy.end(), T(0));
  return absl::OkStatus();
}

template <typename T>
void PagedKvCache<T>::ObserveQuery(int seq, int layer, const T* q, int H, bool exclude_ctrl) {
  const int Hkv = opt_.kv_heads, D = opt_.head_dim, group = H / Hkv;
  for (int h = 0; h < Hkv; ++h)
    kernels::think_observe_queries(head(seq, layer, h).query_energy.data(),
                                   q + static_cast<long>(h) * group * D, group, D, exclude_ctrl);
}

template <typename T>
absl::StatusOr<int> PagedKvCache<T>::NewSlot(Head& hd, int32_t position) {
  if (KvSettles(opt_)) {
    if (absl::Status s = Settle(hd, position); !s.ok()) return s;
    if (hd.length - hd.compressed >= KvResidualSlots(opt_))
      return absl::InternalError(absl::StrFormat(
          "the full-precision residual of %d slots is full (settle lag %d)",
          KvResidualSlots(opt_), opt_.settle_lag));
  } else if (hd.length == static_cast<int>(hd.pages.size()) * opt_.page_size) {
    absl::StatusOr<int32_t> page = alloc_.Allocate();
    if (!page.ok()) return page.status();
    hd.pages.push_back(*page);
    const size_t pool = static_cast<size_t>(alloc_.high_water()) * opt_.page_size * opt_.head_dim;
    if (k_pool_.size() < pool) {
      k_pool_.resize(pool);
      v_pool_.resize(pool);
    }
  }
  hd.positions.push_back(position);
  hd.scores.push_back(0.0f);
  return hd.length++;
}

template <typename T>
absl::Status PagedKvCache<T>::Append(int seq, int layer, int h, const T* key, const T* value,
                                     int32_t position) {
  const int D = opt_.head_dim;
  Head& hd = head(seq, layer, h);
  absl::StatusOr<int> slot = NewSlot(hd, position);
  if (!slot.ok()) return slot.status();
  std::copy(key, key + D, key_row(hd, *slot));
  std::copy(value, value + D, value_row(hd, *slot));
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<T*> PagedKvCache<T>::AddDmc(int seq, int layer, int h, const T* key,
                                           const T* value, T omega, bool merge, int32_t position) {
  Head& hd = head(seq, layer, h);
  int slot;
  if (merge && hd.length > 0) {
    slot = hd.length - 1;  // open, so never settled: in the residual when settling
    hd.positions.back() = position;  // the slot's key is rotated at its newest token
  } else {
    absl::StatusOr<int> fresh = NewSlot(hd, position);
    if (!fresh.ok()) return fresh.status();
    slot = *fresh;
    hd.window.Reset();
  }
  hd.window.Push(key, value, omega);
  hd.window.Mean(key_row(hd, slot), value_row(hd, slot));
  return key_row(hd, slot);
}

template <typename T>
absl::Status PagedKvCache<T>::Evict(int seq, int layer, int h, int slot) {
  Head& hd = head(seq, layer, h);
  if (slot < 0 || slot >= hd.length)
    return absl::OutOfRangeError(absl::StrFormat(
        "evict of slot %d of sequence %d layer %d head %d, which holds %d slots", slot, seq, layer,
        h, hd.length));
  if (slot < hd.compressed)
    return absl::FailedPreconditionError(absl::StrFormat(
        "evict of slot %d of sequence %d layer %d head %d, which is in a compressed page (the "
        "first %d slots are): a quantized or ThinK cache evicts only full-precision slots",
        slot, seq, layer, h, hd.compressed));
  const int last = hd.length - 1;
  if (slot != last) {
    const int D = opt_.head_dim;
    std::copy_n(key_row(hd, last), D, key_row(hd, slot));
    std::copy_n(value_row(hd, last), D, value_row(hd, slot));
    hd.positions[slot] = hd.positions[last];
    hd.scores[slot] = hd.scores[last];
  }
  hd.positions.pop_back();
  hd.scores.pop_back();
  --hd.length;
  if (!KvSettles(opt_) && hd.length == static_cast<int>(hd.pages.size() - 1) * opt_.page_size) {
    if (absl::Status s = alloc_.Free(hd.pages.back()); !s.ok()) return s;
    hd.pages.pop_back();
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status PagedKvCache<T>::Remove(int seq, int layer, int h, int first, int count) {
  Head& hd = head(seq, layer, h);
  if (KvSettles(opt_))
    return absl::FailedPreconditionError(
        "removing slots of a quantized or ThinK cache: its compressed pages never move");
  if (first < 0 || count < 0 || first + count > hd.length)
    return absl::OutOfRangeError(absl::StrFormat(
        "remove of slots [%d, %d) of sequence %d layer %d head %d, which holds %d slots", first,
        first + count, seq, layer, h, hd.length));
  const int D = opt_.head_dim;
  for (int i = first; i + count < hd.length; ++i) {
    std::copy_n(key_row(hd, i + count), D, key_row(hd, i));
    std::copy_n(value_row(hd, i + count), D, value_row(hd, i));
  }
  hd.positions.erase(hd.positions.begin() + first, hd.positions.begin() + first + count);
  hd.scores.erase(hd.scores.begin() + first, hd.scores.begin() + first + count);
  hd.length -= count;
  // A head holds ceil(length / page_size) pages, as Evict leaves it.
  while (!hd.pages.empty() &&
         static_cast<int>(hd.pages.size() - 1) * opt_.page_size >= hd.length) {
    if (absl::Status s = alloc_.Free(hd.pages.back()); !s.ok()) return s;
    hd.pages.pop_back();
  }
  return absl::OkStatus();
}

template <typename T>
void PagedKvCache<T>::BlockTable(const std::vector<int>& seqs, int layer,
                                 std::vector<int32_t>* page_table, std::vector<int>* lengths,
                                 int* max_pages) const {
  const int Hkv = opt_.kv_heads;
  int widest = 1;
  for (int seq : seqs)
    for (int h = 0; h < Hkv; ++h)
      widest = std::max(widest, static_cast<int>(head(seq, layer, h).pages.size()));
  page_table->assign(seqs.size() * Hkv * widest, 0);
  lengths->assign(seqs.size() * Hkv, 0);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int h = 0; h < Hkv; ++h) {
      const Head& hd = head(seqs[i], layer, h);
      std::copy(hd.pages.begin(), hd.pages.end(), page_table->begin() + (i * Hkv + h) * widest);
      (*lengths)[i * Hkv + h] = KvSettles(opt_) ? hd.compressed : hd.length;
    }
  *max_pages = widest;
}

template <typename T>
void PagedKvCache<T>::ResidualTable(const std::vector<int>& seqs, int layer,
                                    std::vector<int32_t>* blocks, std::vector<int>* lengths) const {
  const int Hkv = opt_.kv_heads;
  blocks->assign(seqs.size() * Hkv, 0);
  lengths->assign(seqs.size() * Hkv, 0);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int h = 0; h < Hkv; ++h) {
      const Head& hd = head(seqs[i], layer, h);
      (*blocks)[i * Hkv + h] = hd.block;
      (*lengths)[i * Hkv + h] = hd.length - hd.compressed;
    }
}

template <typename T>
void PagedKvCache<T>::ReadSlot(int seq, int layer, int h, int slot, T* key, T* value) const {
  const Head& hd = head(seq, layer, h);
  const int D = opt_.head_dim;
  if (slot < hd.compressed && KvThink(opt_)) {
    const int P = opt_.page_size, K = opt_.think_channels;
    const long page = hd.pages[slot / P], r = page * P + slot % P;
    const uint8_t* mask = mask_pool_.data() + page * kernels::ThinkMaskBytes(D);
    for (int j = 0, c = 0; j < D; ++j)
      key[j] = kernels::ThinkKept(mask, j) ? k_pool_[r * K + c++] : T(0);
    std::copy_n(v_pool_.begin() + r * D, D, value);
    return;
  }
  if (slot < hd.compressed) {
    kernels::kv_dequantize_row(
        key, value,
        q_pool_.data() + static_cast<long>(hd.pages[slot / opt_.page_size]) * layout_.bytes,
        layout_, slot % opt_.page_size);
    return;
  }
  const long r = row(hd, slot) * D;
  const std::vector<T>& k = KvSettles(opt_) ? r_k_pool_ : k_pool_;
  const std::vector<T>& v = KvSettles(opt_) ? r_v_pool_ : v_pool_;
  std::copy_n(k.begin() + r, D, key);
  std::copy_n(v.begin() + r, D, value);
}

template <typename T>
long PagedKvCache<T>::total_slots(int seq) const {
  long n = 0;
  for (const Head& hd : seq_at(seq).heads) n += hd.length;
  return n;
}

template <typename T>
long PagedKvCache<T>::total_slots() const {
  long n = 0;
  for (const auto& [seq, sq] : seqs_) n += total_slots(seq);
  return n;
}

template <typename T>
long PagedKvCache<T>::bytes(int seq) const {
  long pages = 0;
  for (const Head& hd : seq_at(seq).heads) pages += static_cast<long>(hd.pages.size());
  return pages * alloc_.page_bytes() + reserved_bytes();
}

template class PagedKvCache<float>;
template class PagedKvCache<double>;

}  // namespace dmc::inference
