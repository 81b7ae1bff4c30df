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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "ffi_util.h"

namespace ffi = xla::ffi;

namespace signedcut {
namespace {

constexpr int kLanes = 16;
constexpr int kFlipLanes = 8;

// Σ x_i y_i: 16 independent float lanes (which the compiler vectorises at
// any instruction-set level), then the lanes in double.
double Dot(const float* x, const float* y, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] * y[i + l];
  }
  double sum = 0.0;
  for (; i < n; ++i) sum += static_cast<double>(x[i]) * y[i];
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

double SumAbs(const float* x, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::fabs(x[i]);
  return sum;
}

// y += alpha x.
void Axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline float Sgn(float x) { return x >= 0.0f ? 1.0f : -1.0f; }

// num² / den, the gain of a cut (up to 1/n), as objective._ratio.
inline double Ratio(double num, double den) { return num * num / std::max(den, 1e-30); }

// y = M x for a row-major (rows × cols) M.
void MatVec(const float* mat, const float* x, float* y, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) y[i] = static_cast<float>(Dot(mat + i * cols, x, cols));
}

struct Stats {
  int32_t rounds = 0;
  int32_t flips = 0;
  int32_t full_hs = 0;  // rounds that recomputed H s of the starts in one full pass of H
};

// Single flips of s while (sᵀa)² / (sᵀ hs) rises by more than a 1e-6 fraction.
// sᵀa and sᵀHs after flipping s_i are known in closed form
// (p − 2 s_i a_i and q − 4 s_i (Hs)_i + 4 H_ii), so each flip is one pass over
// the m candidates that also applies the previous flip's row of H to hs; the
// candidates are compared by cross-multiplication (no division per element).
void FlipSearch(const float* h, const float* diag_h, const float* a, int64_t m,
                int32_t max_flips, float* s, float* hs, Stats* stats) {
  if (max_flips <= 0) return;
  double p = Dot(s, a, m), q = Dot(s, hs, m);
  const float* pending = nullptr;  // the row of H still to add to hs, times alpha
  float alpha = 0.0f;
  for (int32_t k = 0; k < max_flips; ++k) {
    // kFlipLanes independent running maxima (lane l sees i ≡ l mod kFlipLanes, in
    // increasing order), so the compare chain does not serialise the loop.
    double lane_num2[kFlipLanes], lane_den[kFlipLanes];
    int64_t lane_i[kFlipLanes];
    for (int l = 0; l < kFlipLanes; ++l) {
      lane_num2[l] = -1.0;
      lane_den[l] = 1.0;
      lane_i[l] = l;
    }
    const auto visit = [&](int64_t i, int l) {
      if (pending) hs[i] += alpha * pending[i];
      const double num = p - 2.0 * s[i] * a[i];
      const double den = std::max(q - 4.0 * s[i] * hs[i] + 4.0 * diag_h[i], 1e-30);
      const double num2 = num * num;
      const bool take = num2 * lane_den[l] > lane_num2[l] * den;  // strictly: first of equals
      lane_num2[l] = take ? num2 : lane_num2[l];
      lane_den[l] = take ? den : lane_den[l];
      lane_i[l] = take ? i : lane_i[l];
    };
    int64_t i0 = 0;
    for (; i0 + kFlipLanes <= m; i0 += kFlipLanes) {
      for (int l = 0; l < kFlipLanes; ++l) visit(i0 + l, l);
    }
    for (int64_t i = i0; i < m; ++i) visit(i, static_cast<int>(i - i0));
    // The lanes' maxima: the largest ratio, the smallest index among equal ones.
    double best_num2 = lane_num2[0], best_den = lane_den[0];
    int64_t bi = lane_i[0];
    for (int l = 1; l < kFlipLanes && l < m; ++l) {
      const double lhs = lane_num2[l] * best_den, rhs = best_num2 * lane_den[l];
      if (lhs > rhs || (lhs == rhs && lane_i[l] < bi)) {
        best_num2 = lane_num2[l];
        best_den = lane_den[l];
        bi = lane_i[l];
      }
    }
    pending = nullptr;
    if (!(best_num2 / best_den > Ratio(p, q) * (1 + 1e-6))) return;
    const float si = s[bi];
    p -= 2.0 * si * a[bi];
    q += -4.0 * si * hs[bi] + 4.0 * diag_h[bi];
    s[bi] = -si;
    pending = h + bi * m;
    alpha = -2.0f * si;
    ++stats->flips;
  }
  if (pending) Axpy(alpha, pending, hs, m);
}

struct Problem {
  const float* p;      // (m, n)
  const float* q;      // (m, n) or null: Q = H⁻¹ P kept by the caller
  const float* h;      // (m, m), exactly symmetric
  const float* h_inv;  // (m, m)
  const float* diag_h; // (m)
  int64_t m, n;
  int32_t max_flips, max_rounds;
};

// The search from (s, hs = H s, t); all three are updated in place.
void Search(const Problem& pr, float* s, float* hs, float* t, Stats* stats) {
  const int64_t m = pr.m, n = pr.n;
  std::vector<float> a(m), b(pr.q ? m : 0), u(n, 0.0f), s_u(m);
  // The two sign starts of the last round and their images H s0, H s1.
  std::vector<float> s0(m), s1(m), s0n(m), s1n(m), hs0(m), hs1(m);
  bool have_img = false;
  std::vector<int64_t> d0, d1, e0, e1, changed;
  for (auto* d : {&d0, &d1, &e0, &e1}) d->reserve(m);
  changed.reserve(std::max(m, n));
  std::vector<float> delta;  // t' − t on the changed columns
  delta.reserve(n);
  MatVec(pr.p, t, a.data(), m, n);
  if (pr.q) MatVec(pr.q, t, b.data(), m, n);
  bool have_u = false;
  double val = -1.0;
  for (int32_t round = 0; round < pr.max_rounds; ++round) {
    // s-step: the best of sgn(a), sgn(Q t or H⁻¹ a) and the current s. H s0 and
    // H s1 are kept from the last round's starts (which differ from this round's
    // where a or b changed sign) or, where fewer rows differ, from H s of the
    // current s; when more than m rows would be read, one fused pass of H.
    if (pr.q) {
      for (int64_t i = 0; i < m; ++i) s1n[i] = Sgn(b[i]);
    } else {
      MatVec(pr.h_inv, a.data(), s1n.data(), m, m);
      for (int64_t i = 0; i < m; ++i) s1n[i] = Sgn(s1n[i]);
    }
    for (int64_t i = 0; i < m; ++i) s0n[i] = Sgn(a[i]);
    const auto diffs = [m](const float* x, const float* y, std::vector<int64_t>* d) {
      d->clear();
      for (int64_t i = 0; i < m; ++i) {
        if (x[i] != y[i]) d->push_back(i);
      }
    };
    // Base of each start's image: its own last image, or the current s.
    diffs(s0n.data(), s, &d0);
    diffs(s1n.data(), s, &d1);
    bool from_img0 = false, from_img1 = false;
    if (have_img) {
      diffs(s0n.data(), s0.data(), &e0);
      diffs(s1n.data(), s1.data(), &e1);
      if (e0.size() < d0.size()) { d0.swap(e0); from_img0 = true; }
      if (e1.size() < d1.size()) { d1.swap(e1); from_img1 = true; }
    }
    if (static_cast<int64_t>(d0.size() + d1.size()) < m) {
      // x' differs from x on the rows i in d, where x'_i − x_i = 2 x'_i, so
      // H x' = H x + Σ_{i∈d} 2 x'_i H_i (H symmetric: row i is column i).
      if (!from_img0) std::copy(hs, hs + m, hs0.begin());
      if (!from_img1) std::copy(hs, hs + m, hs1.begin());
      for (int64_t i : d0) Axpy(2.0f * s0n[i], pr.h + i * m, hs0.data(), m);
      for (int64_t i : d1) Axpy(2.0f * s1n[i], pr.h + i * m, hs1.data(), m);
    } else {
      for (int64_t i = 0; i < m; ++i) {  // one pass of H for both starts
        const float* row = pr.h + i * m;
        hs0[i] = static_cast<float>(Dot(row, s0n.data(), m));
        hs1[i] = static_cast<float>(Dot(row, s1n.data(), m));
      }
      ++stats->full_hs;
    }
    s0.swap(s0n);
    s1.swap(s1n);
    have_img = true;
    const double r0 = Ratio(Dot(s0.data(), a.data(), m), Dot(s0.data(), hs0.data(), m));
    const double r1 = Ratio(Dot(s1.data(), a.data(), m), Dot(s1.data(), hs1.data(), m));
    const double r_prev = Ratio(Dot(s, a.data(), m), Dot(s, hs, m));
    const bool use1 = r1 > r0;
    if (!(r_prev > std::max(r0, r1))) {
      std::copy(use1 ? s1.begin() : s0.begin(), use1 ? s1.end() : s0.end(), s);
      std::copy(use1 ? hs1.begin() : hs0.begin(), use1 ? hs1.end() : hs0.end(), hs);
    }
    FlipSearch(pr.h, pr.diag_h, a.data(), m, pr.max_flips, s, hs, stats);

    // t-step: u = Pᵀ s (incrementally from the last s), t = sgn(u).
    if (have_u) {
      for (int64_t i = 0; i < m; ++i) {
        if (s[i] != s_u[i]) Axpy(s[i] - s_u[i], pr.p + i * n, u.data(), n);
      }
    } else {
      std::fill(u.begin(), u.end(), 0.0f);
      for (int64_t i = 0; i < m; ++i) Axpy(s[i], pr.p + i * n, u.data(), n);
      have_u = true;
    }
    std::copy(s, s + m, s_u.begin());
    changed.clear();
    delta.clear();
    for (int64_t j = 0; j < n; ++j) {
      const float tj = Sgn(u[j]);
      if (tj != t[j]) {
        changed.push_back(j);
        delta.push_back(tj - t[j]);
        t[j] = tj;
      }
    }
    ++stats->rounds;
    const double gain = Ratio(SumAbs(u.data(), n), Dot(s, hs, m));  // sᵀ P sgn(Pᵀs) = ‖Pᵀs‖₁
    const bool improved = gain > val * (1 + 1e-7);
    val = std::max(gain, val);
    if (!improved || round + 1 == pr.max_rounds) break;
    // a = P t (and b = Q t) for the new t, from the changed columns.
    const size_t k = changed.size();
    if (k > 0) {
      for (int64_t i = 0; i < m; ++i) {
        const float* row = pr.p + i * n;
        double acc = 0.0;
        for (size_t c = 0; c < k; ++c) acc += static_cast<double>(delta[c]) * row[changed[c]];
        a[i] += static_cast<float>(acc);
        if (pr.q) {
          const float* qrow = pr.q + i * n;
          double accq = 0.0;
          for (size_t c = 0; c < k; ++c) accq += static_cast<double>(delta[c]) * qrow[changed[c]];
          b[i] += static_cast<float>(accq);
        }
      }
    }
  }
}

ffi::Error HcutSearchImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> h_inv,
                          ffi::Buffer<ffi::F32> diag_h, ffi::Buffer<ffi::F32> s_in,
                          ffi::Buffer<ffi::F32> hs_in, ffi::Buffer<ffi::F32> t_in,
                          ffi::ResultBuffer<ffi::F32> s_out, ffi::ResultBuffer<ffi::F32> hs_out,
                          ffi::ResultBuffer<ffi::F32> t_out, ffi::ResultBuffer<ffi::S32> stats_out,
                          int32_t max_flips, int32_t max_rounds) {
  const auto pd = p.dimensions();
  if (pd.size() != 2 || pd[0] < 1 || pd[1] < 1) {
    return ffi::Error::InvalidArgument("p must be a non-empty (m, n) matrix, got shape " +
                                       DimsToString(pd));
  }
  const int64_t m = pd[0], n = pd[1];
  const auto qd = q.dimensions();
  const bool keep_q = qd.size() == 2 && qd[0] == m && qd[1] == n;
  if (!keep_q && !(qd.size() == 2 && qd[0] == 0)) {
    return ffi::Error::InvalidArgument("q must have shape (" + std::to_string(m) + ", " +
                                       std::to_string(n) + ") or (0, " + std::to_string(n) +
                                       "), got " + DimsToString(qd));
  }
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
  try {
    Search(pr, s, hs, t, &stats);
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
        .Attr<int32_t>("max_rounds"));
