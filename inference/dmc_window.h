// The window state of one DMC head's open (last) slot (model/DMC.md §6).
//
// Training truncates the partial accumulation to the last w tokens: token j contributes to the
// slot at t only if t − j < w. With hard decisions the open slot's content is therefore the
// omega-weighted mean of the raw pre-RoPE keys and values of the (at most w) newest tokens merged
// into it. This ring buffer keeps exactly those tokens, at the model's precision (fp32 for a float
// model, never the cache's storage precision), so decoding equals the training-mode forward with
// hard decisions to round-off — unlike the reference's fp16 running sums with a hard-coded w = 12.
#pragma once

#include <vector>

namespace dmc::inference {

// Bytes of one head's window state: w entries of a key and a value of element_bytes each (the
// width the model's projections give them in) and an importance of state_bytes.
inline long DmcWindowBytes(int window, int head_dim, int element_bytes, int state_bytes) {
  return static_cast<long>(window) * (2L * head_dim * element_bytes + state_bytes);
}

template <typename T>
class DmcWindow {
 public:
  DmcWindow() = default;
  DmcWindow(int window, int head_dim);

  // A new slot opens: forget the tokens of the previous one.
  void Reset() { count_ = 0; }
  // Adds a token to the open slot; the oldest one leaves once w are held.
  void Push(const T* key, const T* value, T omega);
  // The open slot's pre-RoPE key and value: the omega-weighted mean over the window.
  void Mean(T* key, T* value) const;

  // Bytes of the ring buffer (keys, values, importances), charged to the cache budget.
  static long Bytes(int window, int head_dim) {
    return DmcWindowBytes(window, head_dim, sizeof(T), sizeof(T));
  }

 private:
  int window_ = 0, head_dim_ = 0;
  int start_ = 0, count_ = 0;  // ring: the oldest entry at start_
  std::vector<T> keys_, values_, omegas_;
};

}  // namespace dmc::inference
