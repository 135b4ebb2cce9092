// Counter-based noise: every value is a pure function of (seed, stream, index), so the CPU and
// CUDA backends, every data- and tensor-parallel layout and a resumed run draw the same numbers.
// Hash: SplitMix64 finalizer over a mixed 64-bit key (no state to save or restore).
#pragma once
#include <cstdint>

#include "kernels/host_device.h"

namespace dmc::kernels {

// Uniform in the open interval (0, 1), 24 bits of resolution.
DMC_HOST_DEVICE inline float hash_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  uint64_t z = seed ^ (stream * 0x9E3779B97F4A7C15ULL) ^ (index * 0xD1B54A32D192ED03ULL);
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return (static_cast<float>(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// Logistic(0, 1) noise as the difference of two Gumbel(0, 1) samples, -log(-log u), as the DMC
// reference draws it, for out [B, T, Hkv_local]: the element of global sequence seq0 + b, position
// t and global KV head h0 + h has index i = ((seq0 + b)·T + t)·Hkv_total + h0 + h and uses
// counters 2i and 2i+1 of the stream.
template <typename T>
void logistic_noise(T* out, int B, int T_, int Hkv_local, uint64_t seed, uint64_t stream,
                    long seq0, int h0, int Hkv_total);

}  // namespace dmc::kernels
