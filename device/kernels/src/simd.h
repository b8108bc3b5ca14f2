// 8-float helpers of the mask kernels: AVX2 where the compiler targets it, plain loops elsewhere
// (which compilers vectorise for NEON / SSE as far as they can).
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace repnet_kernels {

// bit i set <=> (use_lo && v[i] <= lo) || (use_hi && v[i] >= hi)
inline uint8_t pack8_outside(const float* v, float lo, float hi, bool use_lo, bool use_hi) {
#if defined(__AVX2__)
  const __m256 x = _mm256_loadu_ps(v);
  __m256 m = _mm256_setzero_ps();
  if (use_lo) m = _mm256_or_ps(m, _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_LE_OQ));
  if (use_hi) m = _mm256_or_ps(m, _mm256_cmp_ps(x, _mm256_set1_ps(hi), _CMP_GE_OQ));
  return static_cast<uint8_t>(_mm256_movemask_ps(m));
#else
  unsigned code = 0;
  for (int i = 0; i < 8; ++i) code |= unsigned((use_lo && v[i] <= lo) || (use_hi && v[i] >= hi)) << i;
  return static_cast<uint8_t>(code);
#endif
}

// v[i] = bit i of m set ? fill : v[i]   (src may equal dst)
inline void fill8(const float* src, float* dst, uint8_t m, float fill) {
#if defined(__AVX2__)
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(m), bits), bits);
  _mm256_storeu_ps(dst, _mm256_blendv_ps(_mm256_loadu_ps(src), _mm256_set1_ps(fill), _mm256_castsi256_ps(set)));
#else
  for (int i = 0; i < 8; ++i) dst[i] = ((m >> i) & 1) ? fill : src[i];
#endif
}

// dst[i] = bit (flat0 + i) of mask set ? fill : src[i], for i in [0, len)
inline void fill_masked(const float* src, float* dst, const uint8_t* mask, int64_t flat0, int64_t len, float fill) {
  int64_t i = 0;
  for (; i < len && ((flat0 + i) & 7); ++i) {
    const int64_t f = flat0 + i;
    dst[i] = ((mask[f >> 3] >> (f & 7)) & 1) ? fill : src[i];
  }
  for (; i + 8 <= len; i += 8) fill8(src + i, dst + i, mask[(flat0 + i) >> 3], fill);
  for (; i < len; ++i) {
    const int64_t f = flat0 + i;
    dst[i] = ((mask[f >> 3] >> (f & 7)) & 1) ? fill : src[i];
  }
}

}  // namespace repnet_kernels
