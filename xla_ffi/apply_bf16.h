// The bf16 apply paths (AMX tiles, AVX512-BF16 vdpbf16ps): data layouts shared
// by both, and the micro-kernel table each instruction set provides.
//
// Numerics: x is rounded to bf16 (round to nearest even) once; the signs ±1
// are exact in bf16; every product is exact in f32 and every sum is f32. The
// projection p = c ∘ (x·S) (f32) enters the second product as two bf16 terms,
// p_hi = bf16(p) and p_lo = bf16(p − p_hi), so it carries 16 bits of mantissa
// there (relative error ≤ 2⁻¹⁶), far below the rounding of x (≤ 2⁻⁸ per entry).
// In the single-pass mode (ApplyPrecision::kBf16) only p_hi enters (relative
// error ≤ 2⁻⁸, like x): the P_lo tiles are neither written nor read, and the
// expansion runs half its tile products.
//
// Both products are cast as tile GEMMs with K-pairs interleaved (the VNNI
// layout that TDPBF16PS and VDPBF16PS read):
//   project  Pᵀ (cuts × rows) = S (cuts × m) · Xᵀ (m × rows)
//   expand   Y  (rows × n)    = P (rows × cuts) · Tᵀ (cuts × n)
// "Tiles" below are AMX tiles (≤ 16 rows of 64 bytes); the AVX512-BF16 cores
// read the same memory with zmm loads and dword broadcasts.
#ifndef JAX_SIGNEDCUT_XLA_FFI_APPLY_BF16_H_
#define JAX_SIGNEDCUT_XLA_FFI_APPLY_BF16_H_

#include <cstdint>

namespace signedcut {

// Batch rows per tile: `nb` = min(16, rows) (the rows are padded with zeros
// to a multiple of nb).
//
// Xv (the B operand of the projection): for each 32-element block kb of m and
// batch tile bt, a tile of 16 rows (element pairs 2r, 2r + 1 of the block) ×
// nb columns (batch rows) × 2 (the pair), bf16:
//   Xv[((kb·BT + bt)·16 + r)·2nb + 2b + e] = bf16(x[bt·nb + b, 32kb + 2r + e])
// zero past m and past the rows.
//
// Sx (the A operand of the projection), per block of 16 cuts cb and 32-element
// block kb: 16 rows (cuts) × 32 bf16 ±1 values, one 1 KiB tile, tiles stored
// in order (cb, kb).
//
// Ptmp (the projection's f32 result): per cut block cb and batch tile bt, a
// tile of 16 cuts × nb rows f32 (stride 4nb bytes), tiles in order (cb, bt).
//
// P (the A operand of the expansion), tile-major so that every tile load
// reads 1 KiB of consecutive lines: per batch tile bt and 32-cut block kk two
// tiles of nb rows × 32 cuts bf16 (row stride 64 bytes), P_hi then P_lo:
//   P[((bt·nkk + kk)·2 + h)·32nb + 32b + j] = half h of p[bt·nb + b, 32kk + j].
//
// Tx (the B operand of the expansion), per 16-column tile ct and 32-cut block
// kk: 16 rows (cut pairs 2r, 2r + 1) × 16 columns × 2 (the pair) ±1, one 1 KiB
// tile; tiles stored in order (ct, kk).
//
// Y (the expansion's f32 result), tile-major for the same reason: per batch
// tile bt and 16-column tile ct (nct = ldy / 16, ldy ≥ n a multiple of 32)
// one tile of nb rows × 16 f32 (row stride 64 bytes):
//   Y[(bt·nct + ct)·16nb + 16b + i] = y[bt·nb + b, 16ct + i].
// Vector work (the sign expansion of the next operand) that an expansion
// micro-kernel runs in nkk slices, slice kk right after issuing the tile
// products of block kk, so that it executes while the AMX unit works instead
// of between two micro-kernel calls (where the in-order retirement of the
// long tile products left the vector units idle).
struct Bf16Side {
  void (*step)(const void* ctx, int64_t kk);
  const void* ctx;
};

struct Bf16Core {
  const char* name;
  // Called by a worker before it runs a phase (1: project, 2: expand) with
  // batch tile width nb, and once after its last phase (AMX: tile config
  // and release; nothing for vdpbf16ps).
  void (*begin)(int phase, int64_t nb);
  void (*end)();
  // Projection micro-kernel: for cut blocks cb0 (and cb0 + 1 if two_c) and
  // batch tiles bt0 (and bt0 + 1 if two_b): C(cb, bt) (+)= Σ_kb Sx(cb, kb) ·
  // Xv(kb, bt) over nkb blocks. sx points at tile (cb0, kb0), sx_cb is the
  // distance in elements between cut blocks; xv points at tile (kb0, bt0),
  // xv_kb the distance between kb blocks. c points at Ptmp tile (cb0, bt0),
  // c_cb / c_bt the distances (floats) to the tiles of the next cut block /
  // batch tile. Accumulates into C if `load`, else starts from zero.
  void (*project)(const uint16_t* sx, int64_t sx_cb, const uint16_t* xv, int64_t xv_kb,
                  int64_t nkb, float* c, int64_t c_cb, int64_t c_bt, int64_t nb, bool two_c,
                  bool two_b, bool load);
  // Expansion micro-kernel: for batch tiles bt0 (+1 if two_b) and column
  // tiles ct0 (+1 if two_n): Y(bt, ct) (+)= Σ_kk (P_hi + P_lo)(bt, kk) · Tx(ct, kk)
  // over nkk blocks (P_hi alone if !lo). p points at P tile (bt0, 0, hi), p_bt is the distance in
  // elements to the next batch tile's; tx at tile (ct0, 0), tx_ct the distance
  // in elements between column tiles; y at Y tile (bt0, ct0), y_bt the
  // distance in floats to the next batch tile's (the next column tile's is
  // 16nb). Accumulates into Y if `load`, else starts from zero (the first
  // chunk of cuts: Y need not be initialised). side (may be null): its slices
  // 0..nkk-1, which must not touch the operands or Y of this call.
  void (*expand)(const uint16_t* p, int64_t p_bt, const uint16_t* tx, int64_t tx_ct,
                 int64_t nkk, float* y, int64_t y_bt, int64_t nb, bool two_b, bool two_n,
                 bool lo, bool load, const Bf16Side* side);
};

// Only valid where Cpu().avx512_bf16 / AmxUsable().
const Bf16Core& Avx512Bf16Core();
const Bf16Core& AmxCore();

}  // namespace signedcut

#endif  // JAX_SIGNEDCUT_XLA_FFI_APPLY_BF16_H_
