// The attention-dropout keep mask of seqrec_kernels/reference/dropout.py (and its Triton
// twin), bit for bit, for the C++ CPU path and the CUDA kernels: change all three or none.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SEQREC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SEQREC_HOST_DEVICE inline
#endif

namespace seqrec::dropout {

constexpr uint32_t kMixMult1 = 0x7FEB352Du;  // the "lowbias32" integer finalizer
constexpr uint32_t kMixMult2 = 0x846CA68Bu;
constexpr uint32_t kRowSalt = 0x9E3779B9u;
constexpr uint32_t kColMult = 0x85EBCA6Bu;

SEQREC_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixMult1;
  x ^= x >> 15;
  x *= kMixMult2;
  return x ^ (x >> 16);
}

// Keep iff (hash >> 8) >= this: P(keep) = 1 - threshold / 2**24. Same rounding as Python's
// int(p * (1 << 24)), so pass the double p.
inline uint32_t keep_threshold(double dropout_p) { return static_cast<uint32_t>(dropout_p * (1 << 24)); }

// row_key = (sequence * num_heads + head) * max_seqlen + position of the query.
SEQREC_HOST_DEVICE uint32_t row_hash(int64_t seed, int64_t row_key) {
  return mix32(mix32(static_cast<uint32_t>(row_key) + kRowSalt) ^ static_cast<uint32_t>(seed));
}

// key_pos: position of the key within its sequence.
SEQREC_HOST_DEVICE bool keep(uint32_t row_hash_value, int64_t key_pos, uint32_t threshold) {
  return (mix32(row_hash_value + static_cast<uint32_t>(key_pos) * kColMult) >> 8) >= threshold;
}

}  // namespace seqrec::dropout
