// The greedy signed cut decomposition (SPEC §1), written once against the
// primitive table of kernel.h.
//
// What makes it fast (and where it departs from the readable oracle in
// jax_signedcut/_oracle.py, without changing what it computes):
//  - R and Rᵀ are both kept, so that both images stream contiguous memory.
//  - The images ur = R t and vr = Rᵀ s are kept against the last *flushed* R
//    and updated from the flipped signs only: flips are found by XOR of the
//    old and new sign words, and when more than half flip the image of −t is
//    updated instead (u(t) = −u(−t)), so one update never reads more than half
//    of R. Images are carried across cuts: the fresh random start of the next
//    cut is reached by flips from the previous cut's final signs.
//  - The last P ≤ kBlock cuts are pending: R_cur x = R x − S_blk(c ∘ T_blkᵀ x),
//    with T_blkᵀ x from popcounts of the sign words. Every kBlock cuts the
//    block is flushed into R and Rᵀ in one pass, which also recomputes the
//    images from scratch (against f32 drift: the next cut's start image and
//    the current s image) and ‖R‖² for the max_error test.
//  - Several threads can share one matrix: each owns a slice of whole kChunk
//    blocks of rows of R and of Rᵀ (and of the images), every thread runs the
//    same control flow, and the norms that drive decisions are summed chunk by
//    chunk in a fixed order, so results do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "kernel.h"

namespace signedcut {
namespace {

int64_t RoundUp(int64_t x, int64_t k) { return (x + k - 1) / k * k; }
int64_t Words(int64_t d) { return (d + 31) / 32; }
uint32_t TailMask(int64_t d) {
  return d % 32 == 0 ? 0xFFFFFFFFu : (1u << (d % 32)) - 1u;
}

// Matrices smaller than this are not worth sharing between threads.
constexpr int64_t kTeamMinEntries = 1 << 16;

// 64-byte aligned float array (rows of R start on a cache line).
class FloatBuf {
 public:
  FloatBuf() = default;
  explicit FloatBuf(int64_t n) {
    const size_t bytes = static_cast<size_t>(RoundUp(std::max<int64_t>(n, 1) * 4, 64));
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p_ == nullptr) throw std::bad_alloc();
  }
  FloatBuf(FloatBuf&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  FloatBuf& operator=(FloatBuf&& o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  ~FloatBuf() { std::free(p_); }
  float* get() const { return p_; }

 private:
  float* p_ = nullptr;
};

// Spin-then-yield barrier: the team syncs a few times per half-step, too
// often for a condition variable; yielding keeps an oversubscribed machine
// usable.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void Wait() {
    if (n_ <= 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins > 256) std::this_thread::yield();
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

// Everything one matrix needs, shared by the threads working on it.
struct Workspace {
  int64_t m, n, ldr, ldt, mw, nw, cm, cn;
  FloatBuf r, rt;    // R (m × ldr) and Rᵀ (n × ldt)
  FloatBuf ur, vr;   // images against the flushed R: R t_img, Rᵀ s_img
  FloatBuf sf, tf;   // pending signs expanded to ±1 floats (kBlock × ldt / ldr)
  FloatBuf t0f, u0;  // start signs of the next kBlock cuts (±1, kBlock × ldr) and
                     // their images against the flushed R (kBlock × m)
  std::vector<uint32_t> s_a, s_b, s_img, s_zero, t_a, t_b, t_img;
  std::vector<uint32_t> ps, pt;  // pending sign words, kBlock × mw / nw
  std::vector<float> pc;         // pending scales
  std::vector<double> norms_u, norms_v, row_sumsq;

  Workspace(int64_t m_, int64_t n_)
      : m(m_), n(n_), ldr(RoundUp(n_, 16)), ldt(RoundUp(m_, 16)), mw(Words(m_)),
        nw(Words(n_)), cm((m_ + kChunk - 1) / kChunk), cn((n_ + kChunk - 1) / kChunk),
        r(m_ * ldr), rt(n_ * ldt), ur(m_), vr(n_), sf(kBlock * ldt), tf(kBlock * ldr),
        t0f(kBlock * ldr), u0(kBlock * m_),
        s_a(mw), s_b(mw), s_img(mw), s_zero(mw), t_a(nw), t_b(nw), t_img(nw),
        ps(kBlock * mw), pt(kBlock * nw), pc(kBlock), norms_u(cm), norms_v(cn),
        row_sumsq(m_) {}
};

// Per-thread scratch, allocated before the threads start.
struct Scratch {
  std::vector<const float*> rows;
  std::vector<float> coef, left;
  std::vector<int64_t> pops;
  std::vector<float> pcoef;
  Scratch(int64_t m, int64_t n)
      : rows(std::max(m, n)), coef(std::max(m, n)), left(std::max(m, n) * kBlock),
        pops(kBlock), pcoef(kBlock) {}
};

// One thread's part of decomposing one matrix with a team of `nt` threads.
class TeamMember {
 public:
  TeamMember(const Kernels& k, const GreedyConfig& cfg, const GreedyProblem& pb, Workspace& ws,
             Scratch& sc, Barrier& bar, int tid, int nt)
      : k_(k), cfg_(cfg), pb_(pb), ws_(ws), sc_(sc), bar_(bar), tid_(tid) {
    mlo_ = std::min(ws.m, ws.cm * tid / nt * kChunk);
    mhi_ = std::min(ws.m, ws.cm * (tid + 1) / nt * kChunk);
    nlo_ = std::min(ws.n, ws.cn * tid / nt * kChunk);
    nhi_ = std::min(ws.n, ws.cn * (tid + 1) / nt * kChunk);
    // Word slices of this thread (kChunk is a multiple of 32).
    mw_lo_ = mlo_ / 32;
    mw_hi_ = Words(mhi_);
    nw_lo_ = nlo_ / 32;
    nw_hi_ = Words(nhi_);
  }

  void Run() {
    Init();
    const int64_t m = ws_.m, n = ws_.n, w = cfg_.w;
    const double mn = static_cast<double>(m) * static_cast<double>(n);
    const float mnf = static_cast<float>(m * n);
    const bool early = cfg_.max_error > 0.0;
    const double target = cfg_.max_error * cfg_.max_error * a2_;
    double r2 = a2_;
    int64_t j = 0;
    for (; j < w; ++j) {
      if (early && !(r2 > target)) break;
      const uint32_t* t = pb_.words + j * ws_.nw;
      const uint32_t* s = ws_.s_zero.data();  // the oracle's initial s = +1
      if (j >= start_j0_ && j < start_j0_ + start_q_) {
        // The start image was computed at the last flush: no flips to apply.
        const float* u0 = ws_.u0.get() + (j - start_j0_) * ws_.m;
        std::copy(u0 + mlo_, u0 + mhi_, ws_.ur.get() + mlo_);
        ur_valid_ = true;
        start_exact_ = true;
      }
      double gamma = -std::numeric_limits<double>::infinity();
      double nu = USide(t, Other(ws_.s_a, ws_.s_b, s));
      for (int64_t rounds = 0; rounds < kMaxRounds;) {
        if (!(nu > gamma)) break;
        gamma = nu;
        s = Other(ws_.s_a, ws_.s_b, s);
        const double nv = VSide(s, Other(ws_.t_a, ws_.t_b, t));
        ++rounds;
        if (!(nv > gamma)) break;
        gamma = nv;
        t = Other(ws_.t_a, ws_.t_b, t);
        if (rounds < kMaxRounds) nu = USide(t, Other(ws_.s_a, ws_.s_b, s));
      }
      const float c = static_cast<float>(gamma) / mnf;
      Record(j, s, t, c);
      r2 -= gamma * gamma / mn;
      bar_.Wait();  // the pending entry is complete; side buffers are free
      ++p_;
      if (p_ == kBlock && j + 1 < w) r2 = Flush(j + 1);
    }
    if (tid_ == 0) *pb_.num_cuts = static_cast<int32_t>(j);
  }

 private:
  // The rotation buffer of a side that is not `cur` (cur may be an input).
  static uint32_t* Other(std::vector<uint32_t>& a, std::vector<uint32_t>& b, const uint32_t* cur) {
    return cur == a.data() ? b.data() : a.data();
  }

  void Init() {
    const int64_t m = ws_.m, n = ws_.n;
    const float* a = pb_.a;
    // Zero the outputs: slots past num_cuts stay 0.
    if (tid_ == 0) {
      std::memset(pb_.s_bits, 0, sizeof(uint32_t) * cfg_.w * ws_.mw);
      std::memset(pb_.t_bits, 0, sizeof(uint32_t) * cfg_.w * ws_.nw);
      std::memset(pb_.c, 0, sizeof(float) * cfg_.w);
    }
    for (int64_t i = mlo_; i < mhi_; ++i) {
      std::memcpy(ws_.r.get() + i * ws_.ldr, a + i * n, sizeof(float) * n);
      double s = 0.0;
      for (int64_t jj = 0; jj < n; ++jj) s += static_cast<double>(a[i * n + jj]) * a[i * n + jj];
      ws_.row_sumsq[i] = s;
    }
    // Rᵀ rows nlo..nhi, in blocks that keep both sides in cache.
    constexpr int64_t kT = 32;
    for (int64_t i0 = 0; i0 < m; i0 += kT) {
      const int64_t i1 = std::min(m, i0 + kT);
      for (int64_t j0 = nlo_; j0 < nhi_; j0 += kT) {
        const int64_t j1 = std::min(nhi_, j0 + kT);
        for (int64_t jj = j0; jj < j1; ++jj) {
          float* dst = ws_.rt.get() + jj * ws_.ldt;
          for (int64_t i = i0; i < i1; ++i) dst[i] = a[i * n + jj];
        }
      }
    }
    std::fill(ws_.s_img.begin() + mw_lo_, ws_.s_img.begin() + mw_hi_, 0u);
    std::fill(ws_.s_zero.begin() + mw_lo_, ws_.s_zero.begin() + mw_hi_, 0u);
    p_ = 0;
    ur_valid_ = vr_valid_ = false;
    ExpandStarts(0);
    bar_.Wait();
    a2_ = 0.0;
    for (int64_t i = 0; i < m; ++i) a2_ += ws_.row_sumsq[i];
    ImageStarts();
  }

  // Expands the start signs of cuts j0 .. j0+kBlock-1 (own columns) into t0f.
  void ExpandStarts(int64_t j0) {
    start_j0_ = j0;
    start_q_ = std::max<int64_t>(0, std::min(kBlock, cfg_.w - j0));
    for (int64_t k = 0; k < start_q_; ++k) {
      const uint32_t* tb = pb_.words + (j0 + k) * ws_.nw;
      float* tf = ws_.t0f.get() + k * ws_.ldr;
      for (int64_t jj = nlo_; jj < nhi_; ++jj) tf[jj] = ((tb[jj >> 5] >> (jj & 31)) & 1u) ? -1.0f : 1.0f;
    }
  }

  // u0[k] = R t0_k for own rows (after a barrier that completed t0f and R).
  void ImageStarts() {
    if (mhi_ > mlo_ && start_q_ > 0) {
      k_.multi_rowdots(ws_.u0.get() + mlo_, ws_.m, ws_.r.get() + mlo_ * ws_.ldr, ws_.ldr,
                       mhi_ - mlo_, ws_.t0f.get(), ws_.ldr, start_q_, ws_.n);
    }
  }

  // Flip list of `cur` against `img` (nwords words, d signs): row pointers of
  // `mat` (row stride ld, column offset off) and ±2 coefficients. Returns the
  // count and sets *negate when the complement was listed instead.
  int64_t Flips(const uint32_t* cur, const uint32_t* img, int64_t d, const float* mat, int64_t ld,
                int64_t off, bool* negate) {
    const int64_t nwords = Words(d);
    int64_t flips = 0;
    for (int64_t q = 0; q < nwords; ++q) flips += __builtin_popcount(cur[q] ^ img[q]);
    *negate = 2 * flips > d;
    int64_t count = 0;
    for (int64_t q = 0; q < nwords; ++q) {
      const uint32_t diff = cur[q] ^ img[q];
      uint32_t sel = *negate ? ~diff & (q == nwords - 1 ? TailMask(d) : 0xFFFFFFFFu) : diff;
      while (sel) {
        const int b = __builtin_ctz(sel);
        sel &= sel - 1;
        const int64_t i = q * 32 + b;
        const bool neg_new = (cur[q] >> b) & 1u;
        // Direct: x_new − x_old = 2·x_new on flips. Complement: (−x_new) − x_old
        // = −2·x_old on the unflipped, which equal x_new there.
        sc_.rows[count] = mat + i * ld + off;
        sc_.coef[count] = *negate ? (neg_new ? 2.0f : -2.0f) : (neg_new ? -2.0f : 2.0f);
        ++count;
      }
    }
    return count;
  }

  // u-side half-step for column signs t: brings ur to R t, then writes the
  // signs of u = R_cur t into s_out and returns ‖u‖₁.
  double USide(const uint32_t* t, uint32_t* s_out) {
    const int64_t len = mhi_ - mlo_;
    if (len > 0) {
      if (!ur_valid_) {
        k_.signed_rowdots(ws_.ur.get() + mlo_, ws_.r.get() + mlo_ * ws_.ldr, ws_.ldr, len, t,
                          ws_.n);
      } else if (!start_exact_) {
        bool negate = false;
        const int64_t count =
            Flips(t, ws_.t_img.data(), ws_.n, ws_.rt.get(), ws_.ldt, mlo_, &negate);
        UpdateImage(ws_.ur.get() + mlo_, count, len, negate);
      }
      PendingCoef(ws_.pt.data(), ws_.nw, t, ws_.n);
      k_.finish_image(ws_.ur.get() + mlo_, len, ws_.ps.data(), ws_.mw, mw_lo_, sc_.pcoef.data(),
                      p_, s_out + mw_lo_, ws_.norms_u.data() + mlo_ / kChunk);
    }
    bar_.Wait();
    double norm = 0.0;
    for (int64_t c = 0; c < ws_.cm; ++c) norm += ws_.norms_u[c];
    std::copy(t + nw_lo_, t + nw_hi_, ws_.t_img.begin() + nw_lo_);
    ur_valid_ = true;
    start_exact_ = false;
    return norm;
  }

  // v-side half-step for row signs s (mirror of USide).
  double VSide(const uint32_t* s, uint32_t* t_out) {
    const int64_t len = nhi_ - nlo_;
    if (len > 0) {
      if (!vr_valid_) {
        k_.signed_rowdots(ws_.vr.get() + nlo_, ws_.rt.get() + nlo_ * ws_.ldt, ws_.ldt, len, s,
                          ws_.m);
      } else {
        bool negate = false;
        const int64_t count =
            Flips(s, ws_.s_img.data(), ws_.m, ws_.r.get(), ws_.ldr, nlo_, &negate);
        UpdateImage(ws_.vr.get() + nlo_, count, len, negate);
      }
      PendingCoef(ws_.ps.data(), ws_.mw, s, ws_.m);
      k_.finish_image(ws_.vr.get() + nlo_, len, ws_.pt.data(), ws_.nw, nw_lo_, sc_.pcoef.data(),
                      p_, t_out + nw_lo_, ws_.norms_v.data() + nlo_ / kChunk);
    }
    bar_.Wait();
    double norm = 0.0;
    for (int64_t c = 0; c < ws_.cn; ++c) norm += ws_.norms_v[c];
    std::copy(s + mw_lo_, s + mw_hi_, ws_.s_img.begin() + mw_lo_);
    vr_valid_ = true;
    return norm;
  }

  void UpdateImage(float* y, int64_t count, int64_t len, bool negate) {
    // With the complement listed, y + Σ coef·row is the image of −x.
    k_.add_rows(y, sc_.rows.data(), sc_.coef.data(), count, len);
    if (negate) {
      for (int64_t i = 0; i < len; ++i) y[i] = -y[i];
    }
  }

  // pcoef[k] = c_k · (x_kᵀ x) for the pending cuts' sign words x_k.
  void PendingCoef(const uint32_t* pend, int64_t stride, const uint32_t* x, int64_t d) {
    if (p_ == 0) return;
    k_.xor_popcounts(sc_.pops.data(), pend, stride, p_, x, Words(d));
    for (int64_t k = 0; k < p_; ++k) {
      sc_.pcoef[k] = ws_.pc[k] * static_cast<float>(d - 2 * sc_.pops[k]);
    }
  }

  void Record(int64_t j, const uint32_t* s, const uint32_t* t, float c) {
    std::copy(s + mw_lo_, s + mw_hi_, pb_.s_bits + j * ws_.mw + mw_lo_);
    std::copy(t + nw_lo_, t + nw_hi_, pb_.t_bits + j * ws_.nw + nw_lo_);
    std::copy(s + mw_lo_, s + mw_hi_, ws_.ps.begin() + p_ * ws_.mw + mw_lo_);
    std::copy(t + nw_lo_, t + nw_hi_, ws_.pt.begin() + p_ * ws_.nw + nw_lo_);
    if (tid_ == 0) {
      pb_.c[j] = c;
      ws_.pc[p_] = c;
    }
  }

  // Applies the pending block to R and Rᵀ, recomputes ur for the next cut's
  // start signs t_next and vr for s_img, and returns ‖R‖².
  double Flush(int64_t j_next) {
    const uint32_t* t_next = pb_.words + j_next * ws_.nw;
    const int64_t m = ws_.m, n = ws_.n, p = p_;
    for (int64_t k = 0; k < p; ++k) {
      float* tf = ws_.tf.get() + k * ws_.ldr;
      const uint32_t* tb = ws_.pt.data() + k * ws_.nw;
      for (int64_t jj = nlo_; jj < nhi_; ++jj) tf[jj] = ((tb[jj >> 5] >> (jj & 31)) & 1u) ? -1.0f : 1.0f;
      float* sf = ws_.sf.get() + k * ws_.ldt;
      const uint32_t* sb = ws_.ps.data() + k * ws_.mw;
      for (int64_t i = mlo_; i < mhi_; ++i) sf[i] = ((sb[i >> 5] >> (i & 31)) & 1u) ? -1.0f : 1.0f;
    }
    ExpandStarts(j_next);
    bar_.Wait();
    if (mhi_ > mlo_) {
      for (int64_t i = mlo_; i < mhi_; ++i) {
        for (int64_t k = 0; k < p; ++k) {
          const bool neg = (ws_.ps[k * ws_.mw + (i >> 5)] >> (i & 31)) & 1u;
          sc_.left[(i - mlo_) * p + k] = neg ? -ws_.pc[k] : ws_.pc[k];
        }
      }
      k_.flush_rows(ws_.r.get() + mlo_ * ws_.ldr, ws_.ldr, mhi_ - mlo_, n, sc_.left.data(), p,
                    ws_.tf.get(), ws_.ldr, t_next, ws_.ur.get() + mlo_,
                    ws_.row_sumsq.data() + mlo_);
    }
    ImageStarts();  // own rows of R are final now
    if (nhi_ > nlo_) {
      for (int64_t jj = nlo_; jj < nhi_; ++jj) {
        for (int64_t k = 0; k < p; ++k) {
          const bool neg = (ws_.pt[k * ws_.nw + (jj >> 5)] >> (jj & 31)) & 1u;
          sc_.left[(jj - nlo_) * p + k] = neg ? -ws_.pc[k] : ws_.pc[k];
        }
      }
      k_.flush_rows(ws_.rt.get() + nlo_ * ws_.ldt, ws_.ldt, nhi_ - nlo_, m, sc_.left.data(), p,
                    ws_.sf.get(), ws_.ldt, ws_.s_img.data(), ws_.vr.get() + nlo_, nullptr);
    }
    std::copy(t_next + nw_lo_, t_next + nw_hi_, ws_.t_img.begin() + nw_lo_);
    bar_.Wait();
    p_ = 0;
    ur_valid_ = vr_valid_ = true;  // s_img starts as zeros, so vr matches it
    double r2 = 0.0;
    for (int64_t i = 0; i < m; ++i) r2 += ws_.row_sumsq[i];
    return r2;
  }

  const Kernels& k_;
  const GreedyConfig& cfg_;
  const GreedyProblem& pb_;
  Workspace& ws_;
  Scratch& sc_;
  Barrier& bar_;
  const int tid_;
  int64_t mlo_, mhi_, nlo_, nhi_, mw_lo_, mw_hi_, nw_lo_, nw_hi_;
  double a2_ = 0.0;
  int64_t p_ = 0;
  bool ur_valid_ = false, vr_valid_ = false;
  bool start_exact_ = false;            // ur already holds R t for this cut's start
  int64_t start_j0_ = 0, start_q_ = 0;  // cuts whose start images are in u0
};

void SolveOne(const Kernels& k, const GreedyConfig& cfg, const GreedyProblem& pb, Workspace& ws,
              Scratch& sc) {
  Barrier bar(1);
  TeamMember(k, cfg, pb, ws, sc, bar, 0, 1).Run();
}

}  // namespace

std::string GreedyBatch(const Kernels& k, const GreedyConfig& cfg, const GreedyProblem* problems,
                        int64_t count) {
  if (count <= 0 || cfg.w <= 0) {
    for (int64_t b = 0; b < count; ++b) *problems[b].num_cuts = 0;
    return "";
  }
  int64_t nt = cfg.num_threads > 0 ? cfg.num_threads
                                   : static_cast<int64_t>(std::thread::hardware_concurrency());
  nt = std::clamp<int64_t>(nt, 1, 256);
  const bool team = count < nt && cfg.m * cfg.n >= kTeamMinEntries;
  const int64_t workers = team ? nt : std::min(nt, count);

  std::vector<Workspace> ws;
  std::vector<Scratch> sc;
  try {
    ws.reserve(team ? 1 : workers);
    for (int64_t i = 0; i < (team ? 1 : workers); ++i) ws.emplace_back(cfg.m, cfg.n);
    sc.reserve(workers);
    for (int64_t i = 0; i < workers; ++i) sc.emplace_back(cfg.m, cfg.n);
  } catch (const std::bad_alloc&) {
    return "out of memory allocating the workspace for " + std::to_string(team ? 1 : workers) +
           " matrices of shape (" + std::to_string(cfg.m) + ", " + std::to_string(cfg.n) + ")";
  }

  // Threads wait at a gate until all of them exist; if one cannot be started,
  // the others leave and the caller's thread does all the work alone.
  std::atomic<int> gate{0};  // 0 wait, 1 go, -1 abandon
  std::atomic<int64_t> next{0};
  Barrier bar(static_cast<int>(workers));
  auto work = [&](int tid) {
    if (team) {
      for (int64_t b = 0; b < count; ++b) {
        TeamMember(k, cfg, problems[b], ws[0], sc[tid], bar, tid, static_cast<int>(workers)).Run();
      }
    } else {
      for (int64_t b; (b = next.fetch_add(1)) < count;) SolveOne(k, cfg, problems[b], ws[tid], sc[tid]);
    }
  };
  std::vector<std::thread> threads;
  bool spawned = true;
  try {
    for (int64_t t = 1; t < workers; ++t) {
      threads.emplace_back([&, t] {
        int g;
        while ((g = gate.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
        if (g > 0) work(static_cast<int>(t));
      });
    }
  } catch (const std::system_error&) {
    spawned = false;
  }
  gate.store(spawned ? 1 : -1, std::memory_order_release);
  if (spawned) {
    work(0);
  } else {
    for (auto& th : threads) th.join();
    threads.clear();
    for (int64_t b = 0; b < count; ++b) SolveOne(k, cfg, problems[b], ws[0], sc[0]);
  }
  for (auto& th : threads) th.join();
  return "";
}

}  // namespace signedcut
