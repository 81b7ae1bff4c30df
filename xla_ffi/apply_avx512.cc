// AVX-512 (F + BW) cores of the packed-apply kernel (see apply_kernel.h).
//
// Every function carries its own target attribute; the file is compiled with
// the project's default flags, so nothing AVX-512 leaks into shared inline code
// (SPEC §5). The sign bits are used directly as lane masks: 16 bits of a sign
// word select the lanes of one masked add.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "apply_kernel.h"

#define SIGNEDCUT_AVX512 __attribute__((target("avx512f,avx512bw")))

namespace signedcut {
namespace {

// x block (kRowBlock rows × a column block of ≈ kBlockFloats / rows floats,
// a multiple of 64) held in L1 while all cuts of the range stream past it.
constexpr int64_t kRowBlock = 4;
constexpr int64_t kBlockFloats = 4096;
constexpr int64_t kMaxColBlock = 4096;
// Cuts per expand step: their words for one tile (32 B each) stay in L1 across rows.
constexpr int64_t kCutBlock = 512;

// The 16 sign bits of lanes 16q..16q+15 (little-endian halves of the words).
// A 16-bit load straight into a mask register keeps the shift/kmov pair off
// the vector ports that the masked adds need.
// (GCC lowers _load_mask16 to movzwl + kmovw r32, so say it directly.)
SIGNEDCUT_AVX512 inline __mmask16 Mask16(const uint32_t* bits, int64_t q) {
  __mmask16 k;
  const char* at = reinterpret_cast<const char*>(bits) + 2 * q;
  asm("kmovw %1, %0" : "=k"(k) : "m"(*reinterpret_cast<const uint16_t*>(at)));
  return k;
}

// Σ of x[i] over the lanes i in [0, len) whose bit is set.
SIGNEDCUT_AVX512 inline float MaskedSum(const float* x, const uint32_t* bits, int64_t len) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= len; k += 64) {
    const int64_t q = k / 16;
    a0 = _mm512_mask_add_ps(a0, Mask16(bits, q), a0, _mm512_loadu_ps(x + k));
    a1 = _mm512_mask_add_ps(a1, Mask16(bits, q + 1), a1, _mm512_loadu_ps(x + k + 16));
    a2 = _mm512_mask_add_ps(a2, Mask16(bits, q + 2), a2, _mm512_loadu_ps(x + k + 32));
    a3 = _mm512_mask_add_ps(a3, Mask16(bits, q + 3), a3, _mm512_loadu_ps(x + k + 48));
  }
  for (; k < len; k += 16) {  // tail: masked loads never touch lanes past len
    const uint32_t word = bits[k / 32] >> (k % 32);
    const int64_t left = len - k;
    const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
    const __mmask16 mk = static_cast<__mmask16>(word) & valid;
    a0 = _mm512_mask_add_ps(a0, mk, a0, _mm512_maskz_loadu_ps(mk, x + k));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

}  // namespace

SIGNEDCUT_AVX512 void ApplyProjectAvx512(const ApplyArgs& a, int64_t j0, int64_t j1) {
  const int64_t mw = (a.m + 31) / 32;
  const uint32_t last = a.m % 32 == 0 ? 0xFFFFFFFFu : ((1u << (a.m % 32)) - 1u);
  for (int64_t r0 = 0; r0 < a.rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(a.rows, r0 + kRowBlock);
    const int64_t col_block = std::min(kMaxColBlock, (kBlockFloats / (r1 - r0)) / 64 * 64);
    for (int64_t i0 = 0; i0 < a.m; i0 += col_block) {
      const int64_t len = std::min(a.m - i0, col_block);
      for (int64_t j = j0; j < j1; ++j) {
        const uint32_t* bits = a.s_bits + j * mw + i0 / 32;
        uint32_t tailword[kMaxColBlock / 32];
        if (i0 + len == a.m && last != 0xFFFFFFFFu) {
          // Clear stray tail bits (the format says 0, but never read past m).
          const int64_t nwb = (len + 31) / 32;
          for (int64_t q = 0; q < nwb; ++q) tailword[q] = bits[q];
          tailword[nwb - 1] &= last;
          bits = tailword;
        }
        for (int64_t r = r0; r < r1; ++r) {
          const float s = MaskedSum(a.x + r * a.m + i0, bits, len);
          float* p = a.p + r * a.w + j;
          *p = i0 == 0 ? s : *p + s;
        }
      }
    }
  }
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t j = j0; j < j1; ++j) {
      float* p = a.p + r * a.w + j;
      *p = a.c[j] * (a.row_sums[r] - 2.0f * *p);
    }
}

SIGNEDCUT_AVX512 void ApplyExpandAvx512(const ApplyArgs& a, int64_t i0, int64_t i1) {
  const int64_t nw = (a.n + 31) / 32;
  for (int64_t t0 = i0; t0 < i1; t0 += kApplyTile) {
    const int64_t cols = std::min(kApplyTile, i1 - t0);
    const int64_t nq = (cols + 15) / 16;  // 16-lane chunks in this tile
    const int64_t word0 = t0 / 32;
    for (int64_t jb = 0; jb < a.w; jb += kCutBlock) {
      const int64_t je = std::min(a.w, jb + kCutBlock);
      for (int64_t r = 0; r < a.rows; ++r) {
        float* y = a.y + r * a.n + t0;
        const float* p = a.p + r * a.w;
        if (nq == 16) {
          __m512 acc[16];
#pragma GCC unroll 16
          for (int q = 0; q < 16; ++q)
            acc[q] = jb == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(y + 16 * q);
          for (int64_t j = jb; j < je; ++j) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            const uint32_t* bits = a.t_bits + j * nw + word0;
#pragma GCC unroll 16
            for (int q = 0; q < 16; ++q)
              acc[q] = _mm512_mask_add_ps(acc[q], Mask16(bits, q), acc[q], pj);
          }
#pragma GCC unroll 16
          for (int q = 0; q < 16; ++q) _mm512_storeu_ps(y + 16 * q, acc[q]);
        } else {
          // The last, partial tile of a row: one chunk at a time, masked to n.
          for (int64_t q = 0; q < nq; ++q) {
            const int64_t left = cols - 16 * q;
            const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
            __m512 acc = jb == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(valid, y + 16 * q);
            for (int64_t j = jb; j < je; ++j) {
              const uint32_t word = a.t_bits[j * nw + word0 + q / 2] >> (16 * (q % 2));
              acc = _mm512_mask_add_ps(acc, static_cast<__mmask16>(word) & valid, acc,
                                       _mm512_set1_ps(p[j]));
            }
            _mm512_mask_storeu_ps(y + 16 * q, valid, acc);
          }
        }
      }
    }
    for (int64_t r = 0; r < a.rows; ++r) {
      float* y = a.y + r * a.n + t0;
      const __m512 ps = _mm512_set1_ps(a.p_sums[r]);
      const __m512 two = _mm512_set1_ps(2.0f);
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t left = cols - 16 * q;
        const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(valid, y + 16 * q);
        _mm512_mask_storeu_ps(y + 16 * q, valid, _mm512_fnmadd_ps(two, v, ps));
      }
    }
  }
}

bool ApplyHasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

}  // namespace signedcut
