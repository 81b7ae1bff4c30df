// Applying packed signed cut factors to activations: the plain C++ API of the
// `signedcut_apply` FFI kernel (no XLA types here).
//
// For one matrix W (m, n) = S·diag(c)·Tᵀ in the Flax (in, out) layout and
// activations x (rows, m), y = x·W is computed in two phases:
//
//   project:  p[r, j] = c_j · (x_r · s_j)      = c_j · (Σx_r − 2·Σ_{bit i of s_j set} x_r[i])
//   expand:   y[r, i] = Σ_j p[r, j] · t_j[i]   = Σ_j p[r, j] − 2·Σ_{j: bit i of t_j set} p[r, j]
//
// Sign words use the library layout (element i = bit i % 32 of word i / 32,
// bit 1 means −1, tail bits 0; tail bits are masked off here anyway). All
// arrays are row-major and contiguous. Both phases work on a range of cuts
// [j0, j1), so that each thread projects and expands its own cuts into its own
// output buffer without waiting for the others; the caller sums the buffers.
#ifndef JAX_SIGNEDCUT_XLA_FFI_APPLY_KERNEL_H_
#define JAX_SIGNEDCUT_XLA_FFI_APPLY_KERNEL_H_

#include <cstdint>
#include <functional>
#include <string>

namespace signedcut {

struct ApplyArgs {
  const float* x;          // (rows, m)
  const uint32_t* s_bits;  // (w, ceil(m/32))
  const uint32_t* t_bits;  // (w, ceil(n/32))
  const float* c;          // (w,)
  float* p;                // scratch (rows, w)
  const float* row_sums;   // (rows,) Σ_i x[r, i]
  int64_t rows, m, n, w;
};

// Floats per register-resident block of the AVX-512 cores (16 registers).
constexpr int64_t kApplyTile = 256;

// Project writes p[r, j] for j in [j0, j1). Expand adds to y (rows, n) the
// negative part of those cuts: y[r, i] += Σ_{j in [j0, j1), bit i of t_j set} p[r, j];
// the product is then Σ_j p[r, j] − 2·y[r, i] (ApplySignedCut does that).
// Portable cores.
void ApplyProjectScalar(const ApplyArgs& a, int64_t j0, int64_t j1);
void ApplyExpandScalar(const ApplyArgs& a, int64_t j0, int64_t j1, float* y);

// AVX-512 (F + BW) cores, compiled with per-function target attributes. Only
// call them when Cpu().avx512bw (cpu_features.h) is true.
void ApplyProjectAvx512(const ApplyArgs& a, int64_t j0, int64_t j1);
// The same projection by table lookup, for few rows: for every group of four
// entries of x, a 16-float table of its partial sums (one per sign pattern),
// and the four sign bits of 16 cuts at once pick 16 entries with one vpermps
// (64 sign-multiply-adds per instruction instead of 16 for a masked add).
// ApplyTablesFloats(m) floats per row of x; BuildTables fills them.
int64_t ApplyTablesFloats(int64_t m);
void ApplyBuildTablesAvx512(const ApplyArgs& a, float* tables);
void ApplyProjectLutAvx512(const ApplyArgs& a, const float* tables, int64_t j0, int64_t j1);
void ApplyExpandAvx512(const ApplyArgs& a, int64_t j0, int64_t j1, float* y);

// Runs a task on another thread, now or later, or inline. ApplySignedCut never
// waits for a task to start (only for work a task has claimed), so tasks that
// start late, or never, cost nothing but balance; this is what XLA's intra-op
// thread pool (ffi::ThreadPool) promises.
using TaskRunner = std::function<void(std::function<void()>)>;

// How much rounding a call allows (the FFI attribute "precision"; the Python
// names in jax_signedcut/_kernels/apply.py). kDefault: a bf16 core (where
// `auto` picks one) rounds x to bf16 and feeds p = c ∘ (x·S) to the second
// product as two bf16 halves (≈ 16 mantissa bits). kBf16: the same, with p
// as one bf16 (a single pass: a third fewer tile products, p off by ≤ 2⁻⁸
// relative). kHighest: f32 cores only. The f32 cores ignore the difference
// between kDefault and kBf16.
enum class ApplyPrecision : int32_t { kDefault = 0, kHighest = 1, kBf16 = 2 };

// The implementations of the product. kScalar and kAvx512 compute in f32
// (the reference); kAvx512Bf16 (vdpbf16ps) and kAmx (AMX tiles) round x to
// bf16 and accumulate in f32 (apply_bf16.h states their numerics).
enum class ApplyCore : int32_t { kAuto = 0, kScalar = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// `auto` picks a bf16 core only from this many rows and this much work,
// rows·w·(m + n) multiply-adds: with fewer rows the f32 cores stream the bits
// at the memory floor, and on small products the bf16 paths' set-up (layout
// of x, expansion of the signs) costs as much as it saves, so there is
// nothing to buy with the rounding of x. The AVX512-BF16 core (no AMX) needs
// a whole 16-row batch tile to pay: at 8 rows it half-fills its tile and was
// 1.2x the f32 AVX-512 core's time on 4096² (Zen 4, benchmarks/
// KERNELS_RESULTS.md), from 16 rows 0.8x.
inline constexpr int64_t kAmxMinRows = 8;
inline constexpr int64_t kAvx512Bf16MinRows = 16;
inline constexpr int64_t kBf16MinWork = int64_t{1} << 22;

// The fewest rows from which `auto` takes `core` (a bf16 core).
inline constexpr int64_t Bf16MinRows(ApplyCore core) {
  return core == ApplyCore::kAmx ? kAmxMinRows : kAvx512Bf16MinRows;
}
// From this many batch tiles of 16 rows the bf16 paths split the work by
// rows (each partition all the cuts for its tiles, straight into y) instead
// of by cuts (a buffer per partition, summed at the end).
inline constexpr int64_t kBf16RowTiles = 8;

const char* ApplyCoreName(ApplyCore core);

// The core a call runs. kAuto: the environment variable
// JAX_SIGNEDCUT_APPLY_IMPL ("scalar", "avx512", "avx512_bf16", "amx" or
// "auto"; read once) if set, else the best core this CPU has; bf16 cores only
// from Bf16MinRows(core) rows and kBf16MinWork = rows·w·(m + n), and never if
// `exact` (then the best f32 core). An explicit core is used as asked.
// Returns kAuto and sets *error if the core is unknown or not supported here.
ApplyCore ResolveApplyCore(ApplyCore requested, bool exact, int64_t rows, int64_t work,
                           std::string* error);

// The whole product y = x·S·diag(c)·Tᵀ with a resolved core. The cuts are
// split into a number of partitions that depends only on the shape (so the
// result is the same bit for bit however the work is scheduled); up to
// `threads` workers (0: the usable CPUs) claim partitions one at a time, so a
// worker that is held up by another process leaves its share to the others.
// The caller is one worker; `spawn` starts the others (empty: std::thread).
// `precision` kBf16 makes a bf16 core take p as one bf16 (see ApplyPrecision).
// Returns false if the scratch could not be allocated.
bool ApplySignedCut(const float* x, const uint32_t* s_bits, const uint32_t* t_bits,
                    const float* c, float* y, int64_t rows, int64_t m, int64_t n, int64_t w,
                    ApplyCore core, int threads, const TaskRunner& spawn = {},
                    ApplyPrecision precision = ApplyPrecision::kDefault);

// CPUs this process may run on (its affinity mask), at least 1.
int UsableCpus();

}  // namespace signedcut

#endif  // JAX_SIGNEDCUT_XLA_FFI_APPLY_KERNEL_H_
