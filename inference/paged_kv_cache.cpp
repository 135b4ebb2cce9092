#include "inference/paged_kv_cache.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace dmc::inference {

template <typename T>
PagedKvCache<T>::PagedKvCache(const PagedCacheOptions& options)
    : opt_(options),
      alloc_(options.budget_bytes, KvPageBytes<T>(options)) {}

template <typename T>
absl::Status PagedKvCache<T>::AddSequence(int seq) {
  if (seqs_.count(seq))
    return absl::AlreadyExistsError(absl::StrFormat("sequence %d is already in the cache", seq));
  const long first_pages = static_cast<long>(opt_.layers) * opt_.kv_heads;
  const long need = window_bytes() + first_pages * alloc_.page_bytes();
  if (need > alloc_.free_bytes())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache budget of %d bytes cannot admit sequence %d: its first token needs %d bytes "
        "(%d pages of %d bytes%s), %d of %d bytes are in use by %d sequences",
        alloc_.budget_bytes(), seq, need, first_pages, alloc_.page_bytes(),
        window_bytes() ? absl::StrFormat(" and %d bytes of DMC window state", window_bytes()) : "",
        alloc_.used_bytes(), alloc_.budget_bytes(), num_sequences()));
  if (absl::Status s = alloc_.Reserve(window_bytes()); !s.ok()) return s;
  Sequence& sq = seqs_[seq];
  sq.heads.resize(first_pages);
  if (opt_.dmc_window > 0)
    for (Head& hd : sq.heads) hd.window = DmcWindow<T>(opt_.dmc_window, opt_.head_dim);
  return absl::OkStatus();
}

template <typename T>
absl::Status PagedKvCache<T>::Free(int seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end())
    return absl::NotFoundError(absl::StrFormat("free of sequence %d, which is not in the cache", seq));
  for (const Head& hd : it->second.heads)
    for (int32_t page : hd.pages)
      if (absl::Status s = alloc_.Free(page); !s.ok()) return s;
  if (absl::Status s = alloc_.Release(window_bytes()); !s.ok()) return s;
  seqs_.erase(it);
  return absl::OkStatus();
}

template <typename T>
long PagedKvCache<T>::PagesForStep(const std::vector<int>& seqs) const {
  long pages = 0;
  for (int seq : seqs)
    for (const Head& hd : seq_at(seq).heads)
      pages += hd.length == static_cast<int>(hd.pages.size()) * opt_.page_size ? 1 : 0;
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
absl::StatusOr<long> PagedKvCache<T>::NewSlot(Head& hd, int32_t position) {
  if (hd.length == static_cast<int>(hd.pages.size()) * opt_.page_size) {
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
  return row(hd, hd.length++);
}

template <typename T>
absl::Status PagedKvCache<T>::Append(int seq, int layer, int h, const T* key, const T* value,
                                     int32_t position) {
  const int D = opt_.head_dim;
  absl::StatusOr<long> r = NewSlot(head(seq, layer, h), position);
  if (!r.ok()) return r.status();
  std::copy(key, key + D, k_pool_.begin() + *r * D);
  std::copy(value, value + D, v_pool_.begin() + *r * D);
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<T*> PagedKvCache<T>::AddDmc(int seq, int layer, int h, const T* key,
                                           const T* value, T omega, bool merge, int32_t position) {
  Head& hd = head(seq, layer, h);
  long r;
  if (merge && hd.length > 0) {
    r = row(hd, hd.length - 1);
    hd.positions.back() = position;  // the slot's key is rotated at its newest token
  } else {
    absl::StatusOr<long> fresh = NewSlot(hd, position);
    if (!fresh.ok()) return fresh.status();
    r = *fresh;
    hd.window.Reset();
  }
  hd.window.Push(key, value, omega);
  T* k_row = k_pool_.data() + r * opt_.head_dim;
  hd.window.Mean(k_row, v_pool_.data() + r * opt_.head_dim);
  return k_row;
}

template <typename T>
absl::Status PagedKvCache<T>::Evict(int seq, int layer, int h, int slot) {
  Head& hd = head(seq, layer, h);
  if (slot < 0 || slot >= hd.length)
    return absl::OutOfRangeError(absl::StrFormat(
        "evict of slot %d of sequence %d layer %d head %d, which holds %d slots", slot, seq, layer,
        h, hd.length));
  const int last = hd.length - 1;
  if (slot != last) {
    const int D = opt_.head_dim;
    const long to = row(hd, slot), from = row(hd, last);
    std::copy_n(k_pool_.begin() + from * D, D, k_pool_.begin() + to * D);
    std::copy_n(v_pool_.begin() + from * D, D, v_pool_.begin() + to * D);
    hd.positions[slot] = hd.positions[last];
    hd.scores[slot] = hd.scores[last];
  }
  hd.positions.pop_back();
  hd.scores.pop_back();
  --hd.length;
  if (hd.length == static_cast<int>(hd.pages.size() - 1) * opt_.page_size) {
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
      (*lengths)[i * Hkv + h] = hd.length;
    }
  *max_pages = widest;
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
  return pages * alloc_.page_bytes() + window_bytes();
}

template class PagedKvCache<float>;
template class PagedKvCache<double>;

}  // namespace dmc::inference
