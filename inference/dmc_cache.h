// The DMC KV cache of one sequence (spec §6): per (layer, KV head) a list of slots whose length
// differs from head to head. A token's hard decision either appends a new slot (alpha = 0, and
// always for the first token) or accumulates into the last slot (alpha = 1).
//
// Training truncates accumulation to the last w tokens, so the open (last) slot keeps a window of
// the raw pre-RoPE keys, values and importances of the tokens merged into it; its content is
// their omega-weighted mean, and its key is rotated at the position of the newest token. The
// window state is kept at the model's precision (fp32 in training), so decoding equals the
// training-mode forward with hard decisions to round-off.
#pragma once

#include <cstddef>
#include <deque>
#include <vector>

namespace dmc::inference {

template <typename T>
class DmcCache {
 public:
  DmcCache(int layers, int kv_heads, int head_dim, int window);

  // Adds token state (pre-RoPE key, value, importance) to head (layer, h): appends when !merge.
  void Add(int layer, int h, const T* key, const T* value, T omega, bool merge);

  // Pre-RoPE key of the open slot (omega-weighted mean over its window), to be rotated in place
  // at the newest position by the caller: the rows returned by keys() are rotated keys.
  T* open_key(int layer, int h);
  const T* keys(int layer, int h) const { return head(layer, h).keys.data(); }
  const T* values(int layer, int h) const { return head(layer, h).values.data(); }
  int length(int layer, int h) const { return static_cast<int>(head(layer, h).values.size()) / head_dim_; }
  // Slots over all layers and heads.
  long total_slots() const;
  // Bytes of keys and values held, at sizeof(T) per element.
  long bytes() const { return total_slots() * 2 * head_dim_ * static_cast<long>(sizeof(T)); }

 private:
  struct WindowEntry {
    std::vector<T> key, value;
    T omega;
  };
  struct Head {
    std::vector<T> keys, values;     // [slots, D]
    std::deque<WindowEntry> window;  // tokens of the open slot, at most w
  };
  Head& head(int layer, int h) { return heads_[static_cast<size_t>(layer) * kv_heads_ + h]; }
  const Head& head(int layer, int h) const {
    return heads_[static_cast<size_t>(layer) * kv_heads_ + h];
  }

  int kv_heads_, head_dim_, window_;
  std::vector<Head> heads_;
};

}  // namespace dmc::inference
