// The H-aware alternating sign search of one cut (jax_signedcut/_calibration/
// objective.py, `_cut_search_jnp`, is the readable reference) as one XLA FFI
// call, so that a search costs one custom call instead of up to max_rounds
// XLA loop iterations, each with up to max_flips inner iterations.
//
// The problem, on P = H R (m × n, row-major) for the symmetric PSD metric H:
// maximise (sᵀ P t)² / (sᵀ H s) over s ∈ {±1}^m, t ∈ {±1}^n. Each round takes
// the best s of sgn(P t), sgn(Q t) (Q = H⁻¹ P when the caller keeps it, else
// sgn(H⁻¹ P t)) and the current s, refines it by single flips while the ratio
// rises (at most max_flips), then t = sgn(Pᵀ s); it stops when a round gains
// less than a 1e-7 fraction, or after max_rounds.
//
// Memory traffic is the cost, so the images are kept incrementally rather than
// recomputed (the same idea as the plain greedy's, kernel.h):
//  * a = P t (and b = Q t) are computed in full once; when t then changes in
//    the positions J, a_i += Σ_{j∈J} (t'_j − t_j) P_ij, a gather per row that
//    reads at most the cache lines of P holding those columns;
//  * u = Pᵀ s: when s changes in the rows I, u += Σ_{i∈I} (s'_i − s_i) P_i,
//    |I| contiguous rows instead of all m;
//  * H s for the two sign starts: from the last round's image of the same start
//    or from H s of the current s, whichever differs in fewer rows, by those
//    rows of H, when that is fewer than m rows in all (else one fused pass);
//  * the flips update H s by one (contiguous) row of H each, as the jnp code.
// H⁻¹ P t (without Q) is a full read of H⁻¹ per round.
//
// Arithmetic: vectors in float32 as the jnp reference; dot products summed in
// 16 float lanes and the lanes added in double; the ratios in double. The
// decisions can therefore differ from the jnp reference's where two candidates
// tie within rounding; the tests compare the two and check the search's
// invariants. Never throws, aborts or prints: failures are ffi::Error.
//
// The functions are in hcut_search_core.inc, built twice below (baseline
// x86-64 and AVX-512, identical rounding); a second handler runs the
// backfitting passes in one call (BackfitLoop there).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_features.h"
#include "ffi_util.h"

namespace ffi = xla::ffi;

namespace signedcut {
namespace {

constexpr int kLanes = 16;
constexpr int kFlipLanes = 8;

struct Stats {
  int32_t rounds = 0;
  int32_t flips = 0;
  int32_t full_hs = 0;  // rounds that recomputed H s of the starts in one full pass of H
};

struct Problem {
  const float* p;      // (m, n)
  const float* q;      // (m, n) or null: Q = H⁻¹ P kept by the caller
  const float* h;      // (m, m), exactly symmetric
  const float* h_inv;  // (m, m)
  const float* diag_h; // (m)
  int64_t m, n;
  int32_t max_flips, max_rounds;
  // An optional rank-one term: the search runs on P + rc·rh·rtᵀ (and Q + rc·rhv·rtᵀ)
  // without forming it (the backfit's cut put back). rc = 0: none.
  float rc = 0.0f;
  const float* rh = nullptr;   // (m)
  const float* rhv = nullptr;  // (m), = H⁻¹ rh, when q is kept
  const float* rt = nullptr;   // (n)
};


namespace baseline {
#define HCUT_TARGET
#include "hcut_search_core.inc"
#undef HCUT_TARGET
}  // namespace baseline

namespace avx512 {
#define HCUT_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#include "hcut_search_core.inc"
#undef HCUT_TARGET
}  // namespace avx512

// The instruction set of one call: `isa` 0 (auto: JAX_SIGNEDCUT_HCUT_KERNEL if
// set and not "auto", else AVX-512 where the CPU has it), 1 (baseline) or 2
// (AVX-512). Sets *use_avx512, or returns an error naming the value.
ffi::Error ChooseIsa(int32_t isa, bool* use_avx512) {
  const bool have = Cpu().avx512;
  if (isa == 0) {
    const std::string& env = EnvChoice("JAX_SIGNEDCUT_HCUT_KERNEL");
    if (env.empty() || env == "auto") {
      *use_avx512 = have;
      return ffi::Error::Success();
    }
    if (env == "scalar") {
      isa = 1;
    } else if (env == "avx512") {
      isa = 2;
    } else {
      return ffi::Error::InvalidArgument(
          "JAX_SIGNEDCUT_HCUT_KERNEL must be auto, scalar or avx512, got '" + env + "'");
    }
  }
  if (isa == 1) {
    *use_avx512 = false;
    return ffi::Error::Success();
  }
  if (isa == 2) {
    if (!have) {
      return ffi::Error::InvalidArgument(
          "the avx512 hcut search needs AVX-512 F/BW/DQ/VL, which this CPU does not have");
    }
    *use_avx512 = true;
    return ffi::Error::Success();
  }
  return ffi::Error::InvalidArgument("isa must be 0 (auto), 1 (scalar) or 2 (avx512), got " +
                                     std::to_string(isa));
}

void RunSearch(bool avx, const Problem& pr, float* s, float* hs, float* t, Stats* stats,
               double* num) {
  if (avx) {
    avx512::Search(pr, s, hs, t, stats, num);
  } else {
    baseline::Search(pr, s, hs, t, stats, num);
  }
}

// P (m, n) non-empty and Q (m, n) when kept, else (0, n): sets m, n, keep_q.
ffi::Error CheckPQ(const ffi::Buffer<ffi::F32>& p, const ffi::Buffer<ffi::F32>& q, int64_t* m_out,
                   int64_t* n_out, bool* keep_q) {
  const auto pd = p.dimensions();
  if (pd.size() != 2 || pd[0] < 1 || pd[1] < 1) {
    return ffi::Error::InvalidArgument("p must be a non-empty (m, n) matrix, got shape " +
                                       DimsToString(pd));
  }
  const int64_t m = pd[0], n = pd[1];
  *m_out = m;
  *n_out = n;
  const auto qd = q.dimensions();
  *keep_q = qd.size() == 2 && qd[0] == m && qd[1] == n;
  if (!*keep_q && !(qd.size() == 2 && qd[0] == 0)) {
    return ffi::Error::InvalidArgument("q must have shape (" + std::to_string(m) + ", " +
                                       std::to_string(n) + ") or (0, " + std::to_string(n) +
                                       "), got " + DimsToString(qd));
  }
  return ffi::Error::Success();
}

ffi::Error HcutSearchImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> h_inv,
                          ffi::Buffer<ffi::F32> diag_h, ffi::Buffer<ffi::F32> s_in,
                          ffi::Buffer<ffi::F32> hs_in, ffi::Buffer<ffi::F32> t_in,
                          ffi::ResultBuffer<ffi::F32> s_out, ffi::ResultBuffer<ffi::F32> hs_out,
                          ffi::ResultBuffer<ffi::F32> t_out, ffi::ResultBuffer<ffi::S32> stats_out,
                          int32_t max_flips, int32_t max_rounds, int32_t isa) {
  bool avx = false;
  if (ffi::Error e = ChooseIsa(isa, &avx); e.failure()) return e;
  int64_t m = 0, n = 0;
  bool keep_q = false;
  if (ffi::Error e = CheckPQ(p, q, &m, &n, &keep_q); e.failure()) return e;
  const auto is_square = [m](ffi::Span<const int64_t> d) {
    return d.size() == 2 && d[0] == m && d[1] == m;
  };
  const auto is_vec = [](ffi::Span<const int64_t> d, int64_t len) {
    return d.size() == 1 && d[0] == len;
  };
  if (!is_square(h.dimensions()) || !is_square(h_inv.dimensions())) {
    return ffi::Error::InvalidArgument("h and h_inv must have shape (" + std::to_string(m) +
                                       ", " + std::to_string(m) + "), got " +
                                       DimsToString(h.dimensions()) + " and " +
                                       DimsToString(h_inv.dimensions()));
  }
  if (!is_vec(diag_h.dimensions(), m) || !is_vec(s_in.dimensions(), m) ||
      !is_vec(hs_in.dimensions(), m) || !is_vec(t_in.dimensions(), n) ||
      !is_vec(s_out->dimensions(), m) || !is_vec(hs_out->dimensions(), m) ||
      !is_vec(t_out->dimensions(), n) || !is_vec(stats_out->dimensions(), 3)) {
    return ffi::Error::InvalidArgument(
        "diag_h, s, hs must have shape (" + std::to_string(m) + ",), t (" + std::to_string(n) +
        ",), stats (3,); got diag_h " + DimsToString(diag_h.dimensions()) + ", s " +
        DimsToString(s_in.dimensions()) + ", hs " + DimsToString(hs_in.dimensions()) + ", t " +
        DimsToString(t_in.dimensions()));
  }
  if (max_flips < 0 || max_rounds < 1) {
    return ffi::Error::InvalidArgument("max_flips must be >= 0 and max_rounds >= 1, got " +
                                       std::to_string(max_flips) + " and " +
                                       std::to_string(max_rounds));
  }
  float* s = s_out->typed_data();
  float* hs = hs_out->typed_data();
  float* t = t_out->typed_data();
  std::copy(s_in.typed_data(), s_in.typed_data() + m, s);
  std::copy(hs_in.typed_data(), hs_in.typed_data() + m, hs);
  std::copy(t_in.typed_data(), t_in.typed_data() + n, t);
  Problem pr{p.typed_data(), keep_q ? q.typed_data() : nullptr, h.typed_data(),
             h_inv.typed_data(), diag_h.typed_data(), m, n, max_flips, max_rounds};
  Stats stats;
  double num = 0.0;
  try {
    RunSearch(avx, pr, s, hs, t, &stats, &num);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "out of memory in the hcut search");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  int32_t* st = stats_out->typed_data();
  st[0] = stats.rounds;
  st[1] = stats.flips;
  st[2] = stats.full_hs;
  return ffi::Error::Success();
}

ffi::Error HcutBackfitImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> h_inv,
                           ffi::Buffer<ffi::F32> diag_h, ffi::Buffer<ffi::F32> s_in,
                           ffi::Buffer<ffi::F32> t_in, ffi::Buffer<ffi::F32> c_in,
                           ffi::Buffer<ffi::F32> hs_in, ffi::Buffer<ffi::S32> num_in,
                           ffi::ResultBuffer<ffi::F32> s_out, ffi::ResultBuffer<ffi::F32> t_out,
                           ffi::ResultBuffer<ffi::F32> c_out, ffi::ResultBuffer<ffi::S32> stats_out,
                           int32_t passes, int32_t max_flips, int32_t max_rounds, int32_t isa) {
  bool avx = false;
  if (ffi::Error e = ChooseIsa(isa, &avx); e.failure()) return e;
  int64_t m = 0, n = 0;
  bool keep_q = false;
  if (ffi::Error e = CheckPQ(p, q, &m, &n, &keep_q); e.failure()) return e;
  const auto sq = [m](ffi::Span<const int64_t> d) {
    return d.size() == 2 && d[0] == m && d[1] == m;
  };
  if (!sq(h.dimensions()) || !sq(h_inv.dimensions()) || diag_h.dimensions().size() != 1 ||
      diag_h.dimensions()[0] != m) {
    return ffi::Error::InvalidArgument("h, h_inv must have shape (" + std::to_string(m) + ", " +
                                       std::to_string(m) + ") and diag_h (" + std::to_string(m) +
                                       ",), got " + DimsToString(h.dimensions()) + ", " +
                                       DimsToString(h_inv.dimensions()) + ", " +
                                       DimsToString(diag_h.dimensions()));
  }
  const auto sd = s_in.dimensions();
  if (sd.size() != 2 || sd[1] != m) {
    return ffi::Error::InvalidArgument("s must have shape (width, " + std::to_string(m) +
                                       "), got " + DimsToString(sd));
  }
  const int64_t width = sd[0];
  const auto is = [](ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
    return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
  };
  if (!is(t_in.dimensions(), {width, n}) || !is(c_in.dimensions(), {width}) ||
      !is(hs_in.dimensions(), {width, m}) || num_in.element_count() != 1 ||
      !is(s_out->dimensions(), {width, m}) || !is(t_out->dimensions(), {width, n}) ||
      !is(c_out->dimensions(), {width}) || !is(stats_out->dimensions(), {3})) {
    return ffi::Error::InvalidArgument(
        "t, c, hs must have shapes (" + std::to_string(width) + ", " + std::to_string(n) +
        "), (" + std::to_string(width) + ",), (" + std::to_string(width) + ", " +
        std::to_string(m) + ") and num one element; got " + DimsToString(t_in.dimensions()) +
        ", " + DimsToString(c_in.dimensions()) + ", " + DimsToString(hs_in.dimensions()));
  }
  const int64_t num = num_in.typed_data()[0];
  if (num < 0 || num > width) {
    return ffi::Error::InvalidArgument("num must be in [0, " + std::to_string(width) +
                                       "], got " + std::to_string(num));
  }
  if (passes < 0 || max_flips < 0 || max_rounds < 1) {
    return ffi::Error::InvalidArgument(
        "passes and max_flips must be >= 0 and max_rounds >= 1, got " + std::to_string(passes) +
        ", " + std::to_string(max_flips) + ", " + std::to_string(max_rounds));
  }
  float* s = s_out->typed_data();
  float* t = t_out->typed_data();
  float* c = c_out->typed_data();
  std::copy(s_in.typed_data(), s_in.typed_data() + width * m, s);
  std::copy(t_in.typed_data(), t_in.typed_data() + width * n, t);
  std::copy(c_in.typed_data(), c_in.typed_data() + width, c);
  int32_t* st = stats_out->typed_data();
  std::fill(st, st + 3, 0);
  if (num == 0 || passes == 0) return ffi::Error::Success();
  try {
    std::vector<float> hs(hs_in.typed_data(), hs_in.typed_data() + width * m);
    const auto loop = avx ? avx512::BackfitLoop : baseline::BackfitLoop;
    loop(p.typed_data(), keep_q ? q.typed_data() : nullptr, h.typed_data(),
                       h_inv.typed_data(), diag_h.typed_data(), m, n, width, num, passes,
         max_flips, max_rounds, s, t, c, hs.data(), st);
    return ffi::Error::Success();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "out of memory in the hcut backfit");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

}  // namespace
}  // namespace signedcut

// One H-aware cut search (see the top of this file).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SignedCutHcutSearch, signedcut::HcutSearchImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // p: (m, n) P = H R
        .Arg<ffi::Buffer<ffi::F32>>()    // q: (m, n) Q = H⁻¹ P, or (0, n) when not kept
        .Arg<ffi::Buffer<ffi::F32>>()    // h: (m, m) symmetric metric
        .Arg<ffi::Buffer<ffi::F32>>()    // h_inv: (m, m)
        .Arg<ffi::Buffer<ffi::F32>>()    // diag_h: (m,)
        .Arg<ffi::Buffer<ffi::F32>>()    // s: (m,) start row signs
        .Arg<ffi::Buffer<ffi::F32>>()    // hs: (m,) H s of the start
        .Arg<ffi::Buffer<ffi::F32>>()    // t: (n,) start column signs
        .Ret<ffi::Buffer<ffi::F32>>()    // s: (m,)
        .Ret<ffi::Buffer<ffi::F32>>()    // hs: (m,)
        .Ret<ffi::Buffer<ffi::F32>>()    // t: (n,)
        .Ret<ffi::Buffer<ffi::S32>>()    // stats: rounds, flips, full passes of H for H s
        .Attr<int32_t>("max_flips")
        .Attr<int32_t>("max_rounds")
        .Attr<int32_t>("isa"));

// The backfitting passes over the first num cuts in one call (BackfitLoop above).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SignedCutHcutBackfit, signedcut::HcutBackfitImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()    // p: (m, n) P = H R, every cut out
        .Arg<ffi::Buffer<ffi::F32>>()    // q: (m, n) Q = H⁻¹ P, or (0, n) when not kept
        .Arg<ffi::Buffer<ffi::F32>>()    // h: (m, m) symmetric metric
        .Arg<ffi::Buffer<ffi::F32>>()    // h_inv: (m, m)
        .Arg<ffi::Buffer<ffi::F32>>()    // diag_h: (m,)
        .Arg<ffi::Buffer<ffi::F32>>()    // s: (width, m) row signs
        .Arg<ffi::Buffer<ffi::F32>>()    // t: (width, n) column signs
        .Arg<ffi::Buffer<ffi::F32>>()    // c: (width,) scales
        .Arg<ffi::Buffer<ffi::F32>>()    // hs: (width, m) rows (H s_k)ᵀ
        .Arg<ffi::Buffer<ffi::S32>>()    // num: the cuts visited (the first num)
        .Ret<ffi::Buffer<ffi::F32>>()    // s
        .Ret<ffi::Buffer<ffi::F32>>()    // t
        .Ret<ffi::Buffer<ffi::F32>>()    // c
        .Ret<ffi::Buffer<ffi::S32>>()    // stats: rounds, flips, full passes of H for H s
        .Attr<int32_t>("passes")
        .Attr<int32_t>("max_flips")
        .Attr<int32_t>("max_rounds")
        .Attr<int32_t>("isa"));
