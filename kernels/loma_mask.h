// LoMA (Lossless Compressed Memory Attention, Wang & Xiao, arXiv 2401.09486) training layout:
// the attention mask and the position ids, as pure functions of the zone layout (t, c), so the
// attention kernels evaluate the mask on the fly instead of reading a dense T×T tensor.
//
// A plain window of n·t·c tokens becomes n chunks of S = t·(2c + 1) positions each:
//   chunk i = reading zone    [i·S,            i·S + tc)         the tc original tokens
//             memory zone     [i·S + tc,       i·S + tc + t)     t copies of <m>
//             repetition zone [i·S + tc + t,   (i + 1)·S)        tc copies of <r>
//
// Mask (a query p of chunk i may attend to key j):
//   reading zone i    → memory zones of chunks < i, and reading zone i causally
//   memory zone i     → memory zones of chunks < i, all of reading zone i, memory zone i causally
//   repetition zone i → memory zones of chunks ≤ i, repetition zone i causally; never the text
// Every allowed key is at or before its query, and for each query the allowed keys are the
// earlier memory positions plus ONE contiguous range [lo(p), p]:
//   allowed(p, j) = j ≤ p  and  (j ≥ lo(p)  or  j is a memory position)
//   lo(p) = i·S for reading and memory queries, i·S + tc for repetition queries.
// That form is what makes the mask cheap inside a kernel and lets whole tiles be skipped.
//
// Position ids (fed to RoPE; the plain window's positions 0 .. n·tc - 1 are kept):
//   reading offset r    → i·tc + r         the token's true text position
//   memory slot m       → i·tc + (m+1)·c - 1   the last text position of the c tokens it stands for
//   repetition offset r → i·tc + r         mirrors the token it must reproduce
// (Choices, not read in the paper: see model/README.md, LoMA section.)
#pragma once

namespace dmc::kernels {

enum class LomaZone { kReading, kMemory, kRepetition };

struct LomaZones {
  int t = 0;  // memory slots per chunk (the "target compressed length"); 0 = LoMA off
  int c = 0;  // compression ratio: one chunk's t slots stand for t·c text tokens

  int segment() const { return t * c; }                // tc: text tokens per chunk
  int chunk() const { return t * (2 * c + 1); }         // S: layout positions per chunk
  bool enabled() const { return t > 0; }
};

inline LomaZone loma_zone(int p, const LomaZones& z) {
  const int o = p % z.chunk();
  return o < z.segment() ? LomaZone::kReading
                         : o < z.segment() + z.t ? LomaZone::kMemory : LomaZone::kRepetition;
}

// Lowest key of the contiguous range [lo(p), p] that query p sees.
inline int loma_range_start(int p, const LomaZones& z) {
  const int base = p - p % z.chunk();
  return loma_zone(p, z) == LomaZone::kRepetition ? base + z.segment() : base;
}

inline bool loma_allowed(int query, int key, const LomaZones& z) {
  return key <= query &&
         (key >= loma_range_start(query, z) || loma_zone(key, z) == LomaZone::kMemory);
}

inline int loma_position(int p, const LomaZones& z) {
  const int i = p / z.chunk(), o = p % z.chunk(), tc = z.segment();
  if (o < tc) return i * tc + o;
  if (o < tc + z.t) return i * tc + (o - tc + 1) * z.c - 1;
  return i * tc + (o - tc - z.t);
}

// Whether any (query, key) of the tile [q0, q1) × [k0, k1) is allowed (exact, O(1)); kernels skip
// the tiles for which it is false. See loma_mask.cpp for why it is exact.
bool loma_tile_active(int q0, int q1, int k0, int k1, const LomaZones& z);

}  // namespace dmc::kernels
