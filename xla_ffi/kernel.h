// The greedy signed cut decomposition on raw pointers: no XLA types here.
//
// Two layers:
//  - `Kernels`: a table of the few primitive loops the greedy spends its time
//    in, one table per instruction set (kernel_scalar.cc, kernel_avx512.cc),
//    chosen once at run time by dispatch.cc.
//  - `GreedyBatch`: the algorithm (greedy.cc), written once against the table.
//
// Every primitive fixes its floating-point summation order to a 16-lane
// layout (element i of a chunk goes to lane i % 16, lanes are added in order
// at the end), and the scalar table reproduces it: the scalar and AVX-512
// paths therefore return bit-identical factors on every input, which the tests
// check. The per-element updates (flip corrections, pending corrections,
// flushes) multiply only by ±1 or ±2, which is exact, so their order of
// operations is the same sequence in both tables too.
//
// Sign vectors are packed as in jax_signedcut/_packing.py: element i is bit
// i % 32 of word i / 32, bit 1 means -1, unused tail bits are 0.
#ifndef JAX_SIGNEDCUT_XLA_FFI_KERNEL_H_
#define JAX_SIGNEDCUT_XLA_FFI_KERNEL_H_

#include <cstdint>
#include <string>

namespace signedcut {

// Lanes of the canonical summation order (one AVX-512 f32 register).
inline constexpr int64_t kLanes = 16;
// Elements per partial-norm chunk; thread slices are whole chunks, so that
// results do not depend on the number of threads.
inline constexpr int64_t kChunk = 256;
// Cuts kept pending as a rank-b ±1 correction before being flushed into R.
inline constexpr int64_t kBlock = 32;
// Safety cap on alternation rounds per cut; same as _oracle.MAX_ROUNDS.
inline constexpr int64_t kMaxRounds = 1000;

struct Kernels {
  const char* name;

  // y[i] += coef[r] * rows[r][i] for r = 0..count-1 in order, i < len.
  // coef[r] is ±2 so every product is exact.
  void (*add_rows)(float* y, const float* const* rows, const float* coef,
                   int64_t count, int64_t len);

  // out[r] = Σ_j M[r*ld + j] * sign_j for r < rows, j < len, where sign_j is
  // the packed sign j of `bits` (canonical 16-lane order).
  void (*signed_rowdots)(float* out, const float* m, int64_t ld, int64_t rows,
                         const uint32_t* bits, int64_t len);

  // For i < len (the slice starting at word `word0` of full-length vectors):
  //   y_i = base[i] - Σ_k coef[k] * sign(pend_bits[k*stride + word0 ..], i)
  // with k in order; writes the sign bits of y to out_bits[0 .. ceil(len/32))
  // (word0 relative) and Σ|y_i| of each kChunk-element chunk to norms[..].
  void (*finish_image)(const float* base, int64_t len, const uint32_t* pend_bits,
                       int64_t stride, int64_t word0, const float* coef,
                       int64_t npend, uint32_t* out_bits, double* norms);

  // dots[k] = Σ_words popcount(a[k*stride + w] ^ b[w]) for k < count, w < nwords.
  void (*xor_popcounts)(int64_t* out, const uint32_t* a, int64_t stride,
                        int64_t count, const uint32_t* b, int64_t nwords);

  // Rank-p downdate of `rows` rows of length len:
  //   M[r, j] -= Σ_k left[r*p + k] * right[k*ldr + j]   (k in order)
  // where right holds ±1 values and left[r*p+k] = ±c_k. Then, on the new
  // rows, dots[r] = Σ_j M[r, j] * sign_j(dot_bits) and, if sumsq is not null,
  // sumsq[r] = Σ_j M[r, j]² in double (canonical lanes).
  void (*flush_rows)(float* m, int64_t ld, int64_t rows, int64_t len,
                     const float* left, int64_t p, const float* right, int64_t ldr,
                     const uint32_t* dot_bits, float* dots, double* sumsq);

  // out[k*ldo + r] = Σ_j M[r*ld + j] * x[k*ldx + j] for r < rows, k < q,
  // j < len, where x holds ±1 values (canonical 16-lane order per (r, k), so
  // each equals the signed_rowdots of the same signs).
  void (*multi_rowdots)(float* out, int64_t ldo, const float* m, int64_t ld, int64_t rows,
                        const float* x, int64_t ldx, int64_t q, int64_t len);
};

const Kernels& ScalarKernels();
// Only valid where Avx512Supported().
const Kernels& Avx512Kernels();
bool Avx512Supported();

enum class Impl : int32_t { kAuto = 0, kScalar = 1, kAvx512 = 2 };

// The table for `impl`. kAuto is resolved once, at first use: the
// JAX_SIGNEDCUT_KERNEL environment variable ("scalar" or "avx512") if set,
// else the best the CPU supports. Returns null and sets *error if the
// requested implementation is unknown or unsupported here.
const Kernels* SelectKernels(Impl impl, std::string* error);

// One matrix of a batch: pointers into the caller's buffers.
struct GreedyProblem {
  const float* a;        // (m, n) row-major
  const uint32_t* words; // (w, ceil(n/32)) start signs of each cut
  uint32_t* s_bits;      // (w, ceil(m/32)) out
  uint32_t* t_bits;      // (w, ceil(n/32)) out
  float* c;              // (w,) out
  int32_t* num_cuts;     // () out
};

struct GreedyConfig {
  int64_t m = 0, n = 0, w = 0;
  double max_error = 0.0;   // <= 0: no early stop
  int64_t num_threads = 0;  // <= 0: hardware concurrency
  // Whether threads may share one matrix when there are fewer matrices than
  // threads. Off by default: on a loaded machine (measured: 2 cores shared
  // with other jobs) a team was ~20 % slower than one thread, because a
  // helper descheduled in the middle of its chunk stalls the pass.
  bool share_matrix = false;
};

// The thread settings of a call: `requested` > 0 asks for that many threads
// (and lets them share one matrix); otherwise JAX_SIGNEDCUT_THREADS (read
// once) if set, else all hardware threads over whole matrices only.
void ResolveThreads(int64_t requested, GreedyConfig* cfg);

// Cuts recorded by every GreedyBatch of this process so far (all matrices,
// all threads; relaxed, monotonic). A caller that reads it before and while a
// decomposition runs can show its progress.
int64_t CutsDone();

// Decomposes `count` independent matrices, spreading them over threads (or
// the threads over one matrix when there are fewer matrices than threads).
// Returns an empty string on success, else the reason (allocation failure).
std::string GreedyBatch(const Kernels& k, const GreedyConfig& cfg,
                        const GreedyProblem* problems, int64_t count);

}  // namespace signedcut

#endif  // JAX_SIGNEDCUT_XLA_FFI_KERNEL_H_
