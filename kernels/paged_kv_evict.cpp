#include "kernels/paged_kv_evict.h"

namespace dmc::kernels {
namespace {

// The slot of lowest score(s) among those that candidate(s) admits, ties to the lowest position;
// -1 if none.
template <typename T, typename Score, typename Candidate>
int LowestSlot(const PagedKvLayer<T>& c, long head, int length, const Score& score,
               const Candidate& candidate) {
  int best = -1;
  for (int s = 0; s < length; ++s) {
    if (!candidate(s)) continue;
    if (best < 0 || score(s) < score(best) ||
        (score(s) == score(best) &&
         c.slot_pos[SlotRow(c, head, s)] < c.slot_pos[SlotRow(c, head, best)]))
      best = s;
  }
  return best;
}

// Moves the last slot of `head` into `slot` (rows, position, score) and drops the last.
template <typename T>
void MoveLastInto(const PagedKvLayer<T>& c, float* scores, long head, int slot, int D) {
  const int last = --c.lengths[head];
  if (slot == last) return;
  MoveSlot(c, scores, SlotRow(c, head, slot), SlotRow(c, head, last), D, 0, 1);
}

}  // namespace

template <typename T>
void paged_kv_evict(const PagedKvLayer<T>& c, float* scores, float* probs, int probs_stride,
                    const int32_t* positions, int n, int H, int Hkv, int D,
                    const EvictPolicy& policy) {
  const int G = H / Hkv;
  for (int i = 0; i < n; ++i) {
    const int t = positions[i];
    float* row_probs = probs + static_cast<long>(i) * H * probs_stride;
    if (policy.rule == EvictRule::kH2O) {
      for (int h = 0; h < Hkv; ++h) {
        const long head = static_cast<long>(i) * Hkv + h;
        for (int s = 0; s < c.lengths[head]; ++s) {
          const long r = SlotRow(c, head, s);
          float acc = c.slot_pos[r] == t ? 0.0f : scores[r];
          for (int g = h * G; g < (h + 1) * G; ++g)
            acc += row_probs[static_cast<long>(g) * probs_stride + s];
          scores[r] = acc;
        }
        while (c.lengths[head] > policy.budget) {
          const int victim = LowestSlot(
              c, head, c.lengths[head], [&](int s) { return scores[SlotRow(c, head, s)]; },
              [&](int s) { return c.slot_pos[SlotRow(c, head, s)] <= t - policy.recent; });
          if (victim < 0) break;  // only when recent >= budget, which the engines refuse
          MoveLastInto(c, scores, head, victim, D);
        }
      }
      continue;
    }
    const long head0 = static_cast<long>(i) * Hkv;
    auto mean = [&](int s) {
      double m = 0;
      for (int g = 0; g < H; ++g) m += row_probs[static_cast<long>(g) * probs_stride + s] / H;
      return m;
    };
    while (c.lengths[head0] > policy.budget) {
      const int victim = LowestSlot(c, head0, c.lengths[head0], mean, [](int) { return true; });
      const int last = c.lengths[head0] - 1;
      for (int g = 0; g < H; ++g)
        row_probs[static_cast<long>(g) * probs_stride + victim] =
            row_probs[static_cast<long>(g) * probs_stride + last];
      for (int h = 0; h < Hkv; ++h) MoveLastInto(c, scores, head0 + h, victim, D);
    }
  }
}

template void paged_kv_evict<float>(const PagedKvLayer<float>&, float*, float*, int,
                                    const int32_t*, int, int, int, int, const EvictPolicy&);

}  // namespace dmc::kernels
