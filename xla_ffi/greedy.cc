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
//  - Several threads can share one matrix: one thread runs the control flow
//    and hands out each pass (image update, flush, ...) as chunks of whole
//    kChunk blocks of rows that any thread may claim; a helper that the OS
//    has descheduled claims nothing and delays nobody, so sharing never costs
//    much on a loaded machine. The norms that drive decisions are summed
//    chunk by chunk in a fixed order, so results do not depend on the number
//    of threads or on who ran which chunk.
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

// Fork-join over chunks for one team: the leader publishes a task and claims
// chunks like everyone else; helpers claim chunks while the task lasts.
// Claims carry the task's number, so a helper that wakes up late cannot run a
// chunk of a task that is already over.
class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t chunk, int tid);

  explicit Pool(int nt) : nt_(nt) {}
  int size() const { return nt_; }

  // Runs fn(ctx, c, tid) for c in [0, n) on the team; returns when all ran.
  void ParallelFor(int64_t n, Fn fn, void* ctx) {
    if (nt_ <= 1 || n <= 1) {
      for (int64_t c = 0; c < n; ++c) fn(ctx, c, 0);
      return;
    }
    const uint64_t task = ++task_;
    // First make the old task unclaimable, then write the new one, then open
    // it: a helper that sees any field of the new task (acquire) also sees the
    // closed claim word, so it cannot run a new chunk under an old task number.
    claim_.store((task << 32) | kClosed, std::memory_order_relaxed);
    fn_.store(fn, std::memory_order_release);
    ctx_.store(ctx, std::memory_order_release);
    n_.store(n, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    claim_.store(task << 32, std::memory_order_release);
    Work(task, fn, ctx, n, 0);
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins > 64) std::this_thread::yield();
    }
  }

  void HelperLoop(int tid) {
    uint64_t seen = 0;
    for (int spins = 0;;) {
      if (stop_.load(std::memory_order_acquire)) return;
      const uint64_t c = claim_.load(std::memory_order_acquire);
      const uint64_t task = c >> 32;
      if (task != seen && (c & 0xFFFFFFFFu) != kClosed) {
        seen = task;
        Work(task, fn_.load(std::memory_order_acquire), ctx_.load(std::memory_order_acquire),
             n_.load(std::memory_order_acquire), tid);
        spins = 0;
      } else if (++spins > 64) {
        std::this_thread::yield();
      }
    }
  }

  void Stop() { stop_.store(true, std::memory_order_release); }

 private:
  void Work(uint64_t task, Fn fn, void* ctx, int64_t n, int tid) {
    uint64_t c = claim_.load(std::memory_order_acquire);
    while ((c >> 32) == task && static_cast<int64_t>(c & 0xFFFFFFFFu) < n) {
      if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) {
        fn(ctx, static_cast<int64_t>(c & 0xFFFFFFFFu), tid);
        done_.fetch_add(1, std::memory_order_acq_rel);
        c = claim_.load(std::memory_order_acquire);
      }
    }
  }

  static constexpr uint64_t kClosed = 0xFFFFFFFFu;
  const int nt_;
  uint64_t task_ = 0;  // leader only
  std::atomic<uint64_t> claim_{0};  // (task << 32) | next chunk
  std::atomic<int64_t> done_{0};
  std::atomic<Fn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> n_{0};
  std::atomic<bool> stop_{false};
};

// Everything one matrix needs, shared by the threads working on it.
struct Workspace {
  int64_t m, n, ldr, ldt, mw, nw;
  FloatBuf r, rt;    // R (m × ldr) and Rᵀ (n × ldt)
  FloatBuf ur, vr;   // images against the flushed R: R t_img, Rᵀ s_img
  FloatBuf sf, tf;   // pending signs expanded to ±1 floats (kBlock × ldt / ldr)
  FloatBuf t0f, u0;  // start signs of the next kBlock cuts (±1, kBlock × ldr) and
                     // their images against the flushed R (kBlock × m)
  std::vector<uint32_t> s_a, s_b, s_img, s_zero, t_a, t_b, t_img;
  std::vector<uint32_t> ps, pt;  // pending sign words, kBlock × mw / nw
  std::vector<float> pc;         // pending scales
  std::vector<float> pcoef;      // c_k · (x_kᵀ x) for the current half-step
  std::vector<int64_t> pops;
  std::vector<int64_t> flip_idx;  // rows to add in the current half-step
  std::vector<float> flip_coef;
  std::vector<double> norms_u, norms_v, row_sumsq;

  Workspace(int64_t m_, int64_t n_)
      : m(m_), n(n_), ldr(RoundUp(n_, 16)), ldt(RoundUp(m_, 16)), mw(Words(m_)),
        nw(Words(n_)), r(m_ * ldr), rt(n_ * ldt), ur(m_), vr(n_), sf(kBlock * ldt),
        tf(kBlock * ldr), t0f(kBlock * ldr), u0(kBlock * m_), s_a(mw), s_b(mw), s_img(mw),
        s_zero(mw), t_a(nw), t_b(nw), t_img(nw), ps(kBlock * mw), pt(kBlock * nw), pc(kBlock),
        pcoef(kBlock), pops(kBlock), flip_idx(std::max(m_, n_)), flip_coef(std::max(m_, n_)),
        norms_u((m_ + kChunk - 1) / kChunk), norms_v((n_ + kChunk - 1) / kChunk), row_sumsq(m_) {}
};

// Per-thread scratch, allocated before the threads start.
struct Scratch {
  std::vector<const float*> rows;
  std::vector<float> left;
  Scratch(int64_t m, int64_t n) : rows(std::max(m, n)), left(std::max(m, n) * kBlock) {}
};

// Splits d elements into chunks of whole kChunk blocks, about 4 per thread.
struct Chunks {
  int64_t d = 0, size = 0, count = 0;
  Chunks() = default;
  Chunks(int64_t d_, int nt) : d(d_) {
    const int64_t blocks = (d + kChunk - 1) / kChunk;
    const int64_t per = nt <= 1 ? blocks : std::max<int64_t>(1, blocks / (4 * nt));
    size = per * kChunk;
    count = (d + size - 1) / size;
  }
  int64_t lo(int64_t c) const { return c * size; }
  int64_t hi(int64_t c) const { return std::min(d, (c + 1) * size); }
};

// The greedy on one matrix; the calling thread leads `pool`'s team.
// See CutsDone().
std::atomic<int64_t> g_cuts_done{0};

class Greedy {
 public:
  Greedy(const Kernels& k, const GreedyConfig& cfg, const GreedyProblem& pb, Workspace& ws,
         std::vector<Scratch>& sc, Pool& pool)
      : k_(k), cfg_(cfg), pb_(pb), ws_(ws), sc_(sc), pool_(pool),
        cm_(ws.m, pool.size()), cn_(ws.n, pool.size()) {}

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
        const float* u0 = ws_.u0.get() + (j - start_j0_) * m;
        std::copy(u0, u0 + m, ws_.ur.get());
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
      Record(j, s, t, static_cast<float>(gamma) / mnf);
      r2 -= gamma * gamma / mn;
      ++p_;
      if (p_ == kBlock && j + 1 < w) r2 = Flush(j + 1);
    }
    *pb_.num_cuts = static_cast<int32_t>(j);
  }

 private:
  template <void (Greedy::*Task)(int64_t, int)>
  void Parallel(int64_t n) {
    pool_.ParallelFor(
        n, [](void* self, int64_t c, int tid) { (static_cast<Greedy*>(self)->*Task)(c, tid); },
        this);
  }

  // The rotation buffer of a side that is not `cur` (cur may be an input).
  static uint32_t* Other(std::vector<uint32_t>& a, std::vector<uint32_t>& b, const uint32_t* cur) {
    return cur == a.data() ? b.data() : a.data();
  }

  void Init() {
    std::memset(pb_.s_bits, 0, sizeof(uint32_t) * cfg_.w * ws_.mw);
    std::memset(pb_.t_bits, 0, sizeof(uint32_t) * cfg_.w * ws_.nw);
    std::memset(pb_.c, 0, sizeof(float) * cfg_.w);
    std::fill(ws_.s_img.begin(), ws_.s_img.end(), 0u);
    std::fill(ws_.s_zero.begin(), ws_.s_zero.end(), 0u);
    p_ = 0;
    ur_valid_ = vr_valid_ = start_exact_ = false;
    start_j0_ = 0;
    start_q_ = std::min(kBlock, cfg_.w);
    Parallel<&Greedy::InitTask>(cm_.count + cn_.count);
    Parallel<&Greedy::ImageStartsTask>(cm_.count);
    a2_ = 0.0;
    for (int64_t i = 0; i < ws_.m; ++i) a2_ += ws_.row_sumsq[i];
  }

  // Rows [lo, hi) of R (copy, ‖row‖²) or of Rᵀ (transpose, start signs).
  void InitTask(int64_t c, int) {
    const int64_t m = ws_.m, n = ws_.n;
    const float* a = pb_.a;
    if (c < cm_.count) {
      for (int64_t i = cm_.lo(c); i < cm_.hi(c); ++i) {
        std::memcpy(ws_.r.get() + i * ws_.ldr, a + i * n, sizeof(float) * n);
        double s = 0.0;
        for (int64_t jj = 0; jj < n; ++jj) s += static_cast<double>(a[i * n + jj]) * a[i * n + jj];
        ws_.row_sumsq[i] = s;
      }
      return;
    }
    c -= cm_.count;
    const int64_t lo = cn_.lo(c), hi = cn_.hi(c);
    constexpr int64_t kT = 32;  // blocks that keep both sides in cache
    for (int64_t i0 = 0; i0 < m; i0 += kT) {
      const int64_t i1 = std::min(m, i0 + kT);
      for (int64_t j0 = lo; j0 < hi; j0 += kT) {
        const int64_t j1 = std::min(hi, j0 + kT);
        for (int64_t jj = j0; jj < j1; ++jj) {
          float* dst = ws_.rt.get() + jj * ws_.ldt;
          for (int64_t i = i0; i < i1; ++i) dst[i] = a[i * n + jj];
        }
      }
    }
    ExpandStarts(lo, hi);
  }

  static void Expand(float* dst, const uint32_t* bits, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) dst[i] = ((bits[i >> 5] >> (i & 31)) & 1u) ? -1.0f : 1.0f;
  }

  // Start signs of cuts start_j0_ .. +start_q_ as ±1 floats, columns [lo, hi).
  void ExpandStarts(int64_t lo, int64_t hi) {
    for (int64_t k = 0; k < start_q_; ++k) {
      Expand(ws_.t0f.get() + k * ws_.ldr, pb_.words + (start_j0_ + k) * ws_.nw, lo, hi);
    }
  }

  // u0[k] = R t0_k for rows of chunk c.
  void ImageStartsTask(int64_t c, int) { ImageStarts(cm_.lo(c), cm_.hi(c)); }
  void ImageStarts(int64_t lo, int64_t hi) {
    if (hi > lo && start_q_ > 0) {
      k_.multi_rowdots(ws_.u0.get() + lo, ws_.m, ws_.r.get() + lo * ws_.ldr, ws_.ldr, hi - lo,
                       ws_.t0f.get(), ws_.ldr, start_q_, ws_.n);
    }
  }

  // Lists the rows to add to bring the image of `img` to that of `cur`
  // (d signs) into ws_.flip_*; returns whether the complement was listed.
  bool Flips(const uint32_t* cur, const uint32_t* img, int64_t d) {
    const int64_t nwords = Words(d);
    int64_t flips = 0;
    for (int64_t q = 0; q < nwords; ++q) flips += __builtin_popcount(cur[q] ^ img[q]);
    const bool negate = 2 * flips > d;
    int64_t count = 0;
    for (int64_t q = 0; q < nwords; ++q) {
      const uint32_t diff = cur[q] ^ img[q];
      uint32_t sel = negate ? ~diff & (q == nwords - 1 ? TailMask(d) : 0xFFFFFFFFu) : diff;
      while (sel) {
        const int b = __builtin_ctz(sel);
        sel &= sel - 1;
        const bool neg_new = (cur[q] >> b) & 1u;
        // Direct: x_new − x_old = 2·x_new on flips. Complement: (−x_new) − x_old
        // = −2·x_old on the unflipped, which equal x_new there.
        ws_.flip_idx[count] = q * 32 + b;
        ws_.flip_coef[count] = negate ? (neg_new ? 2.0f : -2.0f) : (neg_new ? -2.0f : 2.0f);
        ++count;
      }
    }
    flip_count_ = count;
    return negate;
  }

  // pcoef[k] = c_k · (x_kᵀ x) for the pending cuts' sign words x_k.
  void PendingCoef(const uint32_t* pend, int64_t stride, const uint32_t* x, int64_t d) {
    if (p_ == 0) return;
    k_.xor_popcounts(ws_.pops.data(), pend, stride, p_, x, Words(d));
    for (int64_t k = 0; k < p_; ++k) {
      ws_.pcoef[k] = ws_.pc[k] * static_cast<float>(d - 2 * ws_.pops[k]);
    }
  }

  enum class Mode { kScratch, kFlips, kNone };

  // One chunk of a half-step: bring y[lo, hi) to the image of x, then write
  // the signs and chunk norms of y minus the pending correction.
  void HalfStep(int64_t lo, int64_t hi, int tid, float* y, const float* rows_of, int64_t ld,
                const float* mat, int64_t ldm, const uint32_t* x, int64_t dx,
                const uint32_t* pend_out, int64_t stride_out, uint32_t* out, double* norms) {
    const int64_t len = hi - lo;
    if (mode_ == Mode::kScratch) {
      k_.signed_rowdots(y + lo, mat + lo * ldm, ldm, len, x, dx);
    } else if (mode_ == Mode::kFlips) {
      const float** rows = sc_[tid].rows.data();
      for (int64_t q = 0; q < flip_count_; ++q) rows[q] = rows_of + ws_.flip_idx[q] * ld + lo;
      k_.add_rows(y + lo, rows, ws_.flip_coef.data(), flip_count_, len);
      // With the complement listed, y + Σ coef·row is the image of −x.
      if (negate_) {
        for (int64_t i = lo; i < hi; ++i) y[i] = -y[i];
      }
    }
    k_.finish_image(y + lo, len, pend_out, stride_out, lo / 32, ws_.pcoef.data(), p_,
                    out + lo / 32, norms + lo / kChunk);
  }

  void UTask(int64_t c, int tid) {
    HalfStep(cm_.lo(c), cm_.hi(c), tid, ws_.ur.get(), ws_.rt.get(), ws_.ldt, ws_.r.get(),
             ws_.ldr, cur_, ws_.n, ws_.ps.data(), ws_.mw, out_, ws_.norms_u.data());
  }
  void VTask(int64_t c, int tid) {
    HalfStep(cn_.lo(c), cn_.hi(c), tid, ws_.vr.get(), ws_.r.get(), ws_.ldr, ws_.rt.get(),
             ws_.ldt, cur_, ws_.m, ws_.pt.data(), ws_.nw, out_, ws_.norms_v.data());
  }

  // u-side half-step for column signs t: brings ur to R t, writes the signs
  // of u = R_cur t into s_out and returns ‖u‖₁.
  double USide(const uint32_t* t, uint32_t* s_out) {
    mode_ = !ur_valid_ ? Mode::kScratch : start_exact_ ? Mode::kNone : Mode::kFlips;
    if (mode_ == Mode::kFlips) negate_ = Flips(t, ws_.t_img.data(), ws_.n);
    PendingCoef(ws_.pt.data(), ws_.nw, t, ws_.n);
    cur_ = t;
    out_ = s_out;
    Parallel<&Greedy::UTask>(cm_.count);
    double norm = 0.0;
    for (const double x : ws_.norms_u) norm += x;
    std::copy(t, t + ws_.nw, ws_.t_img.begin());
    ur_valid_ = true;
    start_exact_ = false;
    return norm;
  }

  // v-side half-step for row signs s (mirror of USide).
  double VSide(const uint32_t* s, uint32_t* t_out) {
    mode_ = !vr_valid_ ? Mode::kScratch : Mode::kFlips;
    if (mode_ == Mode::kFlips) negate_ = Flips(s, ws_.s_img.data(), ws_.m);
    PendingCoef(ws_.ps.data(), ws_.mw, s, ws_.m);
    cur_ = s;
    out_ = t_out;
    Parallel<&Greedy::VTask>(cn_.count);
    double norm = 0.0;
    for (const double x : ws_.norms_v) norm += x;
    std::copy(s, s + ws_.mw, ws_.s_img.begin());
    vr_valid_ = true;
    return norm;
  }

  void Record(int64_t j, const uint32_t* s, const uint32_t* t, float c) {
    g_cuts_done.fetch_add(1, std::memory_order_relaxed);
    std::copy(s, s + ws_.mw, pb_.s_bits + j * ws_.mw);
    std::copy(t, t + ws_.nw, pb_.t_bits + j * ws_.nw);
    std::copy(s, s + ws_.mw, ws_.ps.begin() + p_ * ws_.mw);
    std::copy(t, t + ws_.nw, ws_.pt.begin() + p_ * ws_.nw);
    pb_.c[j] = c;
    ws_.pc[p_] = c;
  }

  // Pending signs as ±1 floats: Tf and the next starts for columns, Sf for rows.
  void ExpandTask(int64_t c, int) {
    if (c < cn_.count) {
      const int64_t lo = cn_.lo(c), hi = cn_.hi(c);
      for (int64_t k = 0; k < p_; ++k) {
        Expand(ws_.tf.get() + k * ws_.ldr, ws_.pt.data() + k * ws_.nw, lo, hi);
      }
      ExpandStarts(lo, hi);
      return;
    }
    c -= cn_.count;
    for (int64_t k = 0; k < p_; ++k) {
      Expand(ws_.sf.get() + k * ws_.ldt, ws_.ps.data() + k * ws_.mw, cm_.lo(c), cm_.hi(c));
    }
  }

  // Rows of R (then their start images) or of Rᵀ: subtract the pending block.
  void FlushTask(int64_t c, int tid) {
    const int64_t p = p_;
    float* left = sc_[tid].left.data();
    if (c < cm_.count) {
      const int64_t lo = cm_.lo(c), hi = cm_.hi(c);
      for (int64_t i = lo; i < hi; ++i) {
        for (int64_t k = 0; k < p; ++k) {
          const bool neg = (ws_.ps[k * ws_.mw + (i >> 5)] >> (i & 31)) & 1u;
          left[(i - lo) * p + k] = neg ? -ws_.pc[k] : ws_.pc[k];
        }
      }
      // In blocks of rows that stay in L2 between the flush and the start
      // images that read them again.
      const int64_t blk = std::max<int64_t>(4, (int64_t{1} << 18) / ws_.ldr / 4 * 4);
      for (int64_t b0 = lo; b0 < hi; b0 += blk) {
        const int64_t b1 = std::min(hi, b0 + blk);
        k_.flush_rows(ws_.r.get() + b0 * ws_.ldr, ws_.ldr, b1 - b0, ws_.n, left + (b0 - lo) * p,
                      p, ws_.tf.get(), ws_.ldr, t_next_, ws_.ur.get() + b0,
                      ws_.row_sumsq.data() + b0);
        ImageStarts(b0, b1);
      }
      return;
    }
    c -= cm_.count;
    const int64_t lo = cn_.lo(c), hi = cn_.hi(c);
    for (int64_t jj = lo; jj < hi; ++jj) {
      for (int64_t k = 0; k < p; ++k) {
        const bool neg = (ws_.pt[k * ws_.nw + (jj >> 5)] >> (jj & 31)) & 1u;
        left[(jj - lo) * p + k] = neg ? -ws_.pc[k] : ws_.pc[k];
      }
    }
    k_.flush_rows(ws_.rt.get() + lo * ws_.ldt, ws_.ldt, hi - lo, ws_.m, left, p, ws_.sf.get(),
                  ws_.ldt, ws_.s_img.data(), ws_.vr.get() + lo, nullptr);
  }

  // Applies the pending block to R and Rᵀ, recomputes the images (ur for the
  // next cut's start, vr for s_img) and the next block's start images, and
  // returns ‖R‖².
  double Flush(int64_t j_next) {
    start_j0_ = j_next;
    start_q_ = std::min(kBlock, cfg_.w - j_next);
    t_next_ = pb_.words + j_next * ws_.nw;
    Parallel<&Greedy::ExpandTask>(cn_.count + cm_.count);
    Parallel<&Greedy::FlushTask>(cm_.count + cn_.count);
    std::copy(t_next_, t_next_ + ws_.nw, ws_.t_img.begin());
    p_ = 0;
    ur_valid_ = vr_valid_ = true;  // s_img starts as zeros, so vr matches it
    double r2 = 0.0;
    for (int64_t i = 0; i < ws_.m; ++i) r2 += ws_.row_sumsq[i];
    return r2;
  }

  const Kernels& k_;
  const GreedyConfig& cfg_;
  const GreedyProblem& pb_;
  Workspace& ws_;
  std::vector<Scratch>& sc_;
  Pool& pool_;
  const Chunks cm_, cn_;
  double a2_ = 0.0;
  int64_t p_ = 0;
  bool ur_valid_ = false, vr_valid_ = false;
  bool start_exact_ = false;            // ur already holds R t for this cut's start
  int64_t start_j0_ = 0, start_q_ = 0;  // cuts whose start images are in u0
  // The current parallel pass (written by the leader before it starts).
  Mode mode_ = Mode::kScratch;
  bool negate_ = false;
  int64_t flip_count_ = 0;
  const uint32_t* cur_ = nullptr;
  uint32_t* out_ = nullptr;
  const uint32_t* t_next_ = nullptr;
};

}  // namespace

int64_t CutsDone() { return g_cuts_done.load(std::memory_order_relaxed); }

std::string GreedyBatch(const Kernels& k, const GreedyConfig& cfg, const GreedyProblem* problems,
                        int64_t count) {
  if (count <= 0 || cfg.w <= 0) {
    for (int64_t b = 0; b < count; ++b) *problems[b].num_cuts = 0;
    return "";
  }
  int64_t nt = cfg.num_threads > 0 ? cfg.num_threads
                                   : static_cast<int64_t>(std::thread::hardware_concurrency());
  nt = std::clamp<int64_t>(nt, 1, 256);
  // Fewer matrices than threads: the threads share each matrix. Otherwise
  // each thread takes whole matrices.
  const bool team = cfg.share_matrix && count < nt && cfg.m * cfg.n >= kTeamMinEntries;
  const int64_t workers = team ? nt : std::min(nt, count);

  std::vector<Workspace> ws;
  std::vector<std::vector<Scratch>> sc;
  try {
    const int64_t nws = team ? 1 : workers;
    ws.reserve(nws);
    sc.resize(nws);
    for (int64_t i = 0; i < nws; ++i) {
      ws.emplace_back(cfg.m, cfg.n);
      for (int64_t t = 0; t < (team ? workers : 1); ++t) sc[i].emplace_back(cfg.m, cfg.n);
    }
  } catch (const std::bad_alloc&) {
    return "out of memory allocating the workspace for " + std::to_string(team ? 1 : workers) +
           " matrices of shape (" + std::to_string(cfg.m) + ", " + std::to_string(cfg.n) + ")";
  }

  std::atomic<int64_t> next{0};
  Pool team_pool(static_cast<int>(team ? workers : 1));
  auto independent = [&](int64_t tid) {
    Pool alone(1);
    for (int64_t b; (b = next.fetch_add(1)) < count;) {
      Greedy(k, cfg, problems[b], ws[tid], sc[tid], alone).Run();
    }
  };
  std::vector<std::thread> threads;
  try {
    for (int64_t t = 1; t < workers; ++t) {
      if (team) {
        threads.emplace_back([&team_pool, t] { team_pool.HelperLoop(static_cast<int>(t)); });
      } else {
        threads.emplace_back(independent, t);
      }
    }
  } catch (const std::system_error&) {
    // Fewer threads than asked: the ones that started (and this one) share
    // the work; a team's leader simply claims the helpers' chunks too.
  }
  if (team) {
    for (int64_t b = 0; b < count; ++b) Greedy(k, cfg, problems[b], ws[0], sc[0], team_pool).Run();
    team_pool.Stop();
  } else {
    independent(0);
  }
  for (auto& th : threads) th.join();
  return "";
}

}  // namespace signedcut
