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

// Cuts per project step: their sign rows (kProjCuts · m/8 bytes) stay in L1
// while x streams past in 256-float blocks.
constexpr int64_t kProjCuts = 64;
// Cuts per expand step: their words for one tile (32 B each) stay in L1 across
// rows, and the row tiles of y are loaded and stored once per block. One row
// (batch 1) uses short blocks, which the prefetches below keep streaming
// (measured 2.0 vs 2.35 ms for the expand of a 4096², w = 16320 layer).
constexpr int64_t kCutBlockOneRow = 64;
constexpr int64_t kCutBlockRows = 512;

// The sign words of the next block of cuts are prefetched while the current
// block is used: each block touches every row of its cuts only 32 bytes at a
// time (one tile), a pattern the hardware prefetchers follow poorly. Without
// this the kernel ran at ~2.4 GB/s from DRAM on a 4096² layer at batch 1;
// with it, as fast as with the bits already in cache.
// (A block of expand cuts is up to 256 KiB at n = 4096: its prefetches go to L2.)
SIGNEDCUT_AVX512 inline void Prefetch(const uint32_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}
SIGNEDCUT_AVX512 inline void PrefetchL2(const uint32_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

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

}  // namespace

// Row r, cuts [jb, je): adds the columns past the last full 256-float block
// (chunk by chunk, masked to m, so stray tail bits past m never select a
// lane) to the 16-lane partial sums, then reduces them into p.
SIGNEDCUT_AVX512 static void ProjectFinishRow(const ApplyArgs& a, int64_t r, int64_t jb,
                                              int64_t je, float* partial) {
  const int64_t mw = (a.m + 31) / 32;
  const float* x = a.x + r * a.m;
  for (int64_t i = a.m / kApplyTile * kApplyTile; i < a.m; i += 16) {
    const int64_t left = a.m - i;
    const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(valid, x + i);
    for (int64_t j = jb; j < je; ++j) {
      const __mmask16 mk = static_cast<__mmask16>(a.s_bits[j * mw + i / 32] >> (i % 32)) & valid;
      float* pp = partial + 16 * (j - jb);
      _mm512_store_ps(pp, _mm512_mask_add_ps(_mm512_load_ps(pp), mk, _mm512_load_ps(pp), xv));
    }
  }
  for (int64_t j = jb; j < je; ++j) {
    const float* pp = partial + 16 * (j - jb);
    float neg = 0.0f;
    for (int q = 0; q < 16; ++q) neg += pp[q];
    a.p[r * a.w + j] = a.c[j] * (a.row_sums[r] - 2.0f * neg);
  }
}

SIGNEDCUT_AVX512 void ApplyProjectAvx512(const ApplyArgs& a, int64_t j0, int64_t j1) {
  // A block of x stays in 16 registers (256 floats of one row, or 128 floats
  // of each of two rows sharing every mask load) while a block of kProjCuts
  // cuts streams past it. Each cut keeps a 16-lane partial sum per row (in
  // L1) that is reduced once at the end.
  const int64_t mw = (a.m + 31) / 32;
  const int64_t full = a.m / kApplyTile;  // complete 256-float blocks
  alignas(64) float partial0[kProjCuts * 16];
  alignas(64) float partial1[kProjCuts * 16];
  for (int64_t jb = j0; jb < j1; jb += kProjCuts) {
    const int64_t je = std::min(j1, jb + kProjCuts);
    int64_t r = 0;
    for (; r + 1 < a.rows; r += 2) {
      const float* x0 = a.x + r * a.m;
      const float* x1 = x0 + a.m;
      for (int64_t j = 0; j < je - jb; ++j) {
        _mm512_store_ps(partial0 + 16 * j, _mm512_setzero_ps());
        _mm512_store_ps(partial1 + 16 * j, _mm512_setzero_ps());
      }
      for (int64_t hb = 0; hb < 2 * full; ++hb) {  // 128-float half blocks
        __m512 xr0[8], xr1[8];
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          xr0[q] = _mm512_loadu_ps(x0 + hb * 128 + 16 * q);
          xr1[q] = _mm512_loadu_ps(x1 + hb * 128 + 16 * q);
        }
        for (int64_t j = jb; j < je; ++j) {
          const uint32_t* bits = a.s_bits + j * mw + hb * 4;
          if (hb % 4 == 0 && j + kProjCuts < a.w) Prefetch(bits + kProjCuts * mw);
          __m512 e0 = _mm512_load_ps(partial0 + 16 * (j - jb)), o0 = _mm512_setzero_ps();
          __m512 e1 = _mm512_load_ps(partial1 + 16 * (j - jb)), o1 = _mm512_setzero_ps();
#pragma GCC unroll 4
          for (int q = 0; q < 8; q += 2) {
            const __mmask16 ke = Mask16(bits, q), ko = Mask16(bits, q + 1);
            e0 = _mm512_mask_add_ps(e0, ke, e0, xr0[q]);
            e1 = _mm512_mask_add_ps(e1, ke, e1, xr1[q]);
            o0 = _mm512_mask_add_ps(o0, ko, o0, xr0[q + 1]);
            o1 = _mm512_mask_add_ps(o1, ko, o1, xr1[q + 1]);
          }
          _mm512_store_ps(partial0 + 16 * (j - jb), _mm512_add_ps(e0, o0));
          _mm512_store_ps(partial1 + 16 * (j - jb), _mm512_add_ps(e1, o1));
        }
      }
      ProjectFinishRow(a, r, jb, je, partial0);
      ProjectFinishRow(a, r + 1, jb, je, partial1);
    }
    for (; r < a.rows; ++r) {
      const float* x = a.x + r * a.m;
      for (int64_t j = 0; j < je - jb; ++j) _mm512_store_ps(partial0 + 16 * j, _mm512_setzero_ps());
      for (int64_t xb = 0; xb < full; ++xb) {
        __m512 xr[16];
#pragma GCC unroll 16
        for (int q = 0; q < 16; ++q) xr[q] = _mm512_loadu_ps(x + xb * kApplyTile + 16 * q);
        for (int64_t j = jb; j < je; ++j) {
          const uint32_t* bits = a.s_bits + j * mw + xb * (kApplyTile / 32);
          if (xb % 2 == 0 && j + kProjCuts < a.w) Prefetch(bits + kProjCuts * mw);
          __m512 e = _mm512_load_ps(partial0 + 16 * (j - jb)), o = _mm512_setzero_ps();
#pragma GCC unroll 8
          for (int q = 0; q < 16; q += 2) {
            e = _mm512_mask_add_ps(e, Mask16(bits, q), e, xr[q]);
            o = _mm512_mask_add_ps(o, Mask16(bits, q + 1), o, xr[q + 1]);
          }
          _mm512_store_ps(partial0 + 16 * (j - jb), _mm512_add_ps(e, o));
        }
      }
      ProjectFinishRow(a, r, jb, je, partial0);
    }
  }
}

SIGNEDCUT_AVX512 void ApplyExpandAvx512(const ApplyArgs& a, int64_t j0, int64_t j1,
                                        float* y_out) {
  const int64_t nw = (a.n + 31) / 32;
  const int64_t i0 = 0, i1 = a.n;
  // Cut blocks outermost: one block of t_bits rows (kCutBlock · nw words) is
  // streamed from memory once and then read tile by tile from L2; within a
  // tile a cut's 16 masks are 32 bytes of one row.
  const int64_t kCutBlock = a.rows == 1 ? kCutBlockOneRow : kCutBlockRows;
  for (int64_t jb = j0; jb < j1; jb += kCutBlock) {
    const int64_t je = std::min(j1, jb + kCutBlock);
    for (int64_t t0 = i0; t0 < i1; t0 += kApplyTile) {
      const int64_t cols = std::min(kApplyTile, i1 - t0);
      const int64_t nq = (cols + 15) / 16;  // 16-lane chunks in this tile
      const int64_t word0 = t0 / 32;
      int64_t r = 0;
      if (nq == 16) {
        // Two rows at a time, half a tile each pass: every mask load feeds two adds.
        for (; r + 1 < a.rows; r += 2) {
          const float* p0 = a.p + r * a.w;
          const float* p1 = p0 + a.w;
          for (int h = 0; h < 2; ++h) {
            float* y0 = y_out + r * a.n + t0 + 128 * h;
            float* y1 = y0 + a.n;
            __m512 acc0[8], acc1[8];
#pragma GCC unroll 8
            for (int q = 0; q < 8; ++q) {
              acc0[q] = _mm512_loadu_ps(y0 + 16 * q);
              acc1[q] = _mm512_loadu_ps(y1 + 16 * q);
            }
            for (int64_t j = jb; j < je; ++j) {
              const __m512 pj0 = _mm512_set1_ps(p0[j]), pj1 = _mm512_set1_ps(p1[j]);
              const uint32_t* bits = a.t_bits + j * nw + word0 + 4 * h;
              if (h == 0 && r == 0 && j + kCutBlock < a.w) PrefetchL2(bits + kCutBlock * nw);
#pragma GCC unroll 8
              for (int q = 0; q < 8; ++q) {
                const __mmask16 k = Mask16(bits, q);
                acc0[q] = _mm512_mask_add_ps(acc0[q], k, acc0[q], pj0);
                acc1[q] = _mm512_mask_add_ps(acc1[q], k, acc1[q], pj1);
              }
            }
#pragma GCC unroll 8
            for (int q = 0; q < 8; ++q) {
              _mm512_storeu_ps(y0 + 16 * q, acc0[q]);
              _mm512_storeu_ps(y1 + 16 * q, acc1[q]);
            }
          }
        }
      }
      for (; r < a.rows; ++r) {
        float* y = y_out + r * a.n + t0;
        const float* p = a.p + r * a.w;
        if (nq == 16) {
          __m512 acc[16];
#pragma GCC unroll 16
          for (int q = 0; q < 16; ++q)
            acc[q] = _mm512_loadu_ps(y + 16 * q);
          for (int64_t j = jb; j < je; ++j) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            const uint32_t* bits = a.t_bits + j * nw + word0;
            if (r == 0 && j + kCutBlock < a.w) PrefetchL2(bits + kCutBlock * nw);
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
            __m512 acc = _mm512_maskz_loadu_ps(valid, y + 16 * q);
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
  }
}

int64_t ApplyTablesFloats(int64_t m) { return (m + 31) / 32 * 8 * 16; }

SIGNEDCUT_AVX512 void ApplyBuildTablesAvx512(const ApplyArgs& a, float* tables) {
  // Lane v of table g holds Σ_{k < 4, bit k of v set} x[4g + k] (x is zero past
  // m, so stray tail bits pick zeros). Bit k of the lane index is set in the
  // lanes of these masks:
  constexpr __mmask16 kBit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  const int64_t groups = ApplyTablesFloats(a.m) / 16;
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = a.x + r * a.m;
    float* tab = tables + r * groups * 16;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 t = _mm512_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        const int64_t i = 4 * g + k;
        if (i < a.m) t = _mm512_mask_add_ps(t, kBit[k], t, _mm512_set1_ps(x[i]));
      }
      _mm512_storeu_ps(tab + 16 * g, t);
    }
  }
}

namespace {

// In-register transpose of a 16×16 block of 32-bit words: r[i] word e ↔ r[e] word i.
SIGNEDCUT_AVX512 inline void Transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // Now 128-bit lane L of u[4i + e] holds word 4L + e of rows 4i..4i+3.
  for (int e = 0; e < 4; ++e) {
    const __m512i a0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88);
    const __m512i a1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
    const __m512i b0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
    const __m512i b1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_i32x4(a0, b0, 0x88);
    r[e + 4] = _mm512_shuffle_i32x4(a1, b1, 0x88);
    r[e + 8] = _mm512_shuffle_i32x4(a0, b0, 0xDD);
    r[e + 12] = _mm512_shuffle_i32x4(a1, b1, 0xDD);
  }
}

}  // namespace

SIGNEDCUT_AVX512 void ApplyProjectLutAvx512(const ApplyArgs& a, const float* tables,
                                            int64_t j0, int64_t j1) {
  // kLutGroups groups of 16 cuts share each table load (the tables of a
  // 4096-wide x are 64 KiB, more than L1: loading one per lookup made the L2
  // the bottleneck).
  constexpr int kLutGroups = 4;
  const int64_t mw = (a.m + 31) / 32;
  const int64_t groups = mw * 8;
  alignas(64) uint32_t cols[kLutGroups][16][16];
  for (int64_t jb = j0; jb < j1; jb += 16 * kLutGroups) {
    const uint32_t* base = a.s_bits + jb * mw;
    const int64_t cnt = std::min<int64_t>(16 * kLutGroups, j1 - jb);
    const int ng = static_cast<int>((cnt + 15) / 16);
    for (int64_t r = 0; r < a.rows; ++r) {
      const float* tab = tables + r * groups * 16;
      __m512 acc[kLutGroups][2];
      for (int g = 0; g < kLutGroups; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
      for (int64_t q0 = 0; q0 < mw; q0 += 16) {
        // Words q0..q0+15 of each cut (one 64-byte line), transposed so that
        // cols[g][e] holds word q0 + e of the 16 cuts of group g, one per lane.
        const int64_t nq = std::min<int64_t>(16, mw - q0);
        const __mmask16 words = nq == 16 ? 0xFFFF : static_cast<__mmask16>((1u << nq) - 1u);
        for (int g = 0; g < ng; ++g) {
          __m512i v[16];
          for (int i = 0; i < 16; ++i) {
            const int64_t cut = 16 * g + i;
            v[i] = cut < cnt ? _mm512_maskz_loadu_epi32(words, base + cut * mw + q0)
                             : _mm512_setzero_si512();
            if (r == 0 && jb + 16 * kLutGroups + cut < a.w)
              Prefetch(base + (16 * kLutGroups + cut) * mw + q0);
          }
          Transpose16(v);
          for (int e = 0; e < 16; ++e) _mm512_store_si512(cols[g][e], v[e]);
        }
        for (int64_t e = 0; e < nq; ++e) {
          const float* tq = tab + 8 * 16 * (q0 + e);
          __m512i w[kLutGroups];
          for (int g = 0; g < ng; ++g) w[g] = _mm512_load_si512(cols[g][e]);
#pragma GCC unroll 8
          for (int k = 0; k < 8; ++k) {
            const __m512 t = _mm512_loadu_ps(tq + 16 * k);
            for (int g = 0; g < ng; ++g) {
              // vpermps reads the low four bits of each index: nibble k of the word.
              const __m512i idx = k == 0 ? w[g] : _mm512_srli_epi32(w[g], 4 * k);
              acc[g][k & 1] = _mm512_add_ps(acc[g][k & 1], _mm512_permutexvar_ps(idx, t));
            }
          }
        }
      }
      for (int g = 0; g < ng; ++g) {
        const int64_t left = cnt - 16 * g;
        const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
        const __m512 neg = _mm512_add_ps(acc[g][0], acc[g][1]);
        const __m512 pv = _mm512_mul_ps(
            _mm512_maskz_loadu_ps(valid, a.c + jb + 16 * g),
            _mm512_fnmadd_ps(_mm512_set1_ps(2.0f), neg, _mm512_set1_ps(a.row_sums[r])));
        _mm512_mask_storeu_ps(a.p + r * a.w + jb + 16 * g, valid, pv);
      }
    }
  }
}

}  // namespace signedcut
