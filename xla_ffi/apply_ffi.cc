// XLA FFI handler `signedcut_apply`: y = ((x·S) ∘ c)·Tᵀ from packed factors,
// the choice of core, and the threaded driver.
//
// Three layers, as in jax's examples/ffi: the cores (apply_scalar.cc,
// apply_avx512.cc; the bf16 paths apply_bf16_layout.cc with apply_amx.cc or
// apply_avx512bf16.cc) on raw pointers; ApplySignedCut, which splits the work
// over threads; and ApplyImpl, which checks the buffers and returns
// ffi::Error — it never throws, aborts or prints.
#include <algorithm>
#include <atomic>
#include <memory>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "apply_bf16.h"
#include "apply_bf16_driver.h"
#include "apply_kernel.h"
#include "cpu_features.h"
#include "ffi_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace signedcut {
namespace {

// Partitions of the cuts for a problem of this shape: each owns an output
// buffer of rows·n floats, and the buffers are summed in a fixed order. More
// partitions balance better when a worker is delayed; each should keep at
// least a few hundred cuts and the buffers should stay small.
int64_t Partitions(int64_t rows, int64_t m, int64_t n, int64_t w) {
  // Below ~4M lane-adds a second worker costs more than it saves.
  if (rows * w * (m + n) < (int64_t{1} << 22)) return 1;
  // Four: enough to rebalance two or four workers; each extra partition
  // starts cold (measured 2.3 / 2.5 / 2.7 ms for 2 / 4 / 16 partitions at batch
  // 1 on a 4096², w = 16320 layer, two threads).
  int64_t parts = std::min<int64_t>(4, std::max<int64_t>(1, w / 256));
  while (parts > 1 && parts * rows * n > (int64_t{1} << 23)) parts /= 2;  // ≤ 32 MiB
  return parts;
}

// Up to this many rows the projection looks its sums up in tables of x (the
// tables take 32 bytes per entry of x and row; the lookups do the work of four
// masked adds each, but are repeated per row).
constexpr int64_t kLutMaxRows = 4;

ApplyCore Supported(ApplyCore core, std::string* error) {
  std::string why;
  switch (core) {
    case ApplyCore::kScalar:
      return core;
    case ApplyCore::kAvx512:
      if (Cpu().avx512bw) return core;
      why = "this CPU lacks AVX-512 F and BW";
      break;
    case ApplyCore::kAvx512Bf16:
      if (Cpu().avx512_bf16) return core;
      why = "this CPU lacks AVX512_BF16 (with AVX-512 F, BW, VL, DQ, VPOPCNTDQ and BMI2)";
      break;
    case ApplyCore::kAmx:
      if (Cpu().avx512_bf16 && AmxUsable(&why)) return core;
      if (why.empty()) why = "this CPU lacks AVX512_BF16, which the AMX path also uses";
      break;
    default:
      *error = "signedcut_apply: unknown implementation " +
               std::to_string(static_cast<int>(core));
      return ApplyCore::kAuto;
  }
  *error = std::string("signedcut_apply: the ") + ApplyCoreName(core) +
           " implementation was requested but " + why;
  return ApplyCore::kAuto;
}

ApplyCore BestF32() { return Cpu().avx512bw ? ApplyCore::kAvx512 : ApplyCore::kScalar; }

ApplyCore BestBf16() {
  if (Cpu().avx512_bf16 && AmxUsable()) return ApplyCore::kAmx;
  if (Cpu().avx512_bf16) return ApplyCore::kAvx512Bf16;
  return ApplyCore::kAuto;
}

bool IsBf16(ApplyCore core) {
  return core == ApplyCore::kAvx512Bf16 || core == ApplyCore::kAmx;
}

// Shared between the caller and the workers it spawned. A worker that starts
// after every partition has been claimed touches only this (kept alive by
// shared_ptr), never the caller's buffers.
struct ApplyJob {
  ApplyArgs a;
  ApplyCore core;
  bool p_lo = true;            // bf16 cores: p in two bf16 halves (else one)
  int64_t parts;
  float* y;                    // the output (f32 cores: partition 0's buffer)
  std::vector<float> extra;    // f32 cores: partitions 1..
  std::vector<float> tables;   // lookup tables of x (few rows), else empty
  // bf16 cores. By cuts (few batch tiles): a tile-major buffer per partition,
  // summed into y at the end. By rows (kBf16RowTiles batch tiles or more):
  // each partition owns a range of batch tiles for all the cuts, in one
  // buffer, and writes its rows of y itself.
  Bf16Shape shape;
  bool by_rows = false;
  std::unique_ptr<float[]> ybuf;  // written before read: not initialised
  std::vector<uint16_t> xv;
  std::vector<Bf16Scratch> scratch;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  int64_t BufferFloats() const {
    return IsBf16(core) ? shape.rows_pad * shape.ldy : a.rows * a.n;
  }

  // Batch tiles [bt0, bt1) of partition k when by rows (pairs of tiles, for
  // the micro-kernels' 2×2 blocks).
  std::pair<int64_t, int64_t> RowTiles(int64_t k) const {
    const int64_t pairs = (shape.bt + 1) / 2;
    return {2 * (pairs * k / parts), std::min(shape.bt, 2 * (pairs * (k + 1) / parts))};
  }

  void Work() {
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      const int64_t j0 = a.w * k / parts, j1 = a.w * (k + 1) / parts;
      switch (core) {
        case ApplyCore::kAmx:
        case ApplyCore::kAvx512Bf16: {
          const Bf16Core& c = core == ApplyCore::kAmx ? AmxCore() : Avx512Bf16Core();
          if (by_rows) {
            const auto [bt0, bt1] = RowTiles(k);
            Bf16Partition(c, a, shape, xv.data(), 0, a.w, bt0, bt1, ybuf.get(), scratch[k],
                          p_lo);
            Bf16StoreRows(ybuf.get(), 1, 0, shape, bt0 * shape.nb,
                          std::min(a.rows, bt1 * shape.nb), a.n, y);
          } else {
            Bf16Partition(c, a, shape, xv.data(), j0, j1, 0, shape.bt,
                          ybuf.get() + k * BufferFloats(), scratch[k], p_lo);
          }
          break;
        }
        case ApplyCore::kAvx512: {
          float* out = k == 0 ? y : extra.data() + (k - 1) * BufferFloats();
          if (tables.empty()) {
            ApplyProjectAvx512(a, j0, j1);
          } else {
            ApplyProjectLutAvx512(a, tables.data(), j0, j1);
          }
          ApplyExpandAvx512(a, j0, j1, out);
          break;
        }
        default: {
          float* out = k == 0 ? y : extra.data() + (k - 1) * BufferFloats();
          ApplyProjectScalar(a, j0, j1);
          ApplyExpandScalar(a, j0, j1, out);
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

}  // namespace

const char* ApplyCoreName(ApplyCore core) {
  switch (core) {
    case ApplyCore::kScalar:
      return "scalar";
    case ApplyCore::kAvx512:
      return "avx512";
    case ApplyCore::kAvx512Bf16:
      return "avx512_bf16";
    case ApplyCore::kAmx:
      return "amx";
    default:
      return "auto";
  }
}

ApplyCore ResolveApplyCore(ApplyCore requested, bool exact, int64_t rows, int64_t work,
                           std::string* error) {
  if (requested != ApplyCore::kAuto) return Supported(requested, error);
  // The environment's choice, resolved once.
  struct EnvPick {
    ApplyCore core = ApplyCore::kAuto;  // kAuto: none
    std::string error;
  };
  static const EnvPick env = [] {
    EnvPick p;
    const std::string& v = EnvChoice("JAX_SIGNEDCUT_APPLY_IMPL");
    if (v.empty() || v == "auto") return p;
    for (ApplyCore c : {ApplyCore::kScalar, ApplyCore::kAvx512, ApplyCore::kAvx512Bf16,
                        ApplyCore::kAmx}) {
      if (v == ApplyCoreName(c)) {
        p.core = Supported(c, &p.error);
        return p;
      }
    }
    p.error = "JAX_SIGNEDCUT_APPLY_IMPL must be 'scalar', 'avx512', 'avx512_bf16', 'amx' or "
              "'auto', got '" + v + "'";
    return p;
  }();
  if (!env.error.empty()) {
    *error = env.error;
    return ApplyCore::kAuto;
  }
  if (env.core != ApplyCore::kAuto) {
    return exact && IsBf16(env.core) ? BestF32() : env.core;
  }
  if (!exact && work >= kBf16MinWork) {
    const ApplyCore b = BestBf16();
    if (b != ApplyCore::kAuto && rows >= Bf16MinRows(b)) return b;
  }
  return BestF32();
}

bool ApplySignedCut(const float* x, const uint32_t* s_bits, const uint32_t* t_bits,
                    const float* c, float* y, int64_t rows, int64_t m, int64_t n, int64_t w,
                    ApplyCore core, int threads, const TaskRunner& spawn,
                    ApplyPrecision precision) {
  if (threads <= 0) threads = UsableCpus();
  int64_t parts = Partitions(rows, m, n, w);
  const bool bf16 = IsBf16(core);
  const Bf16Shape shape = bf16 ? Bf16ShapeOf(rows, m, n) : Bf16Shape{};
  // By rows the result does not depend on the number of partitions (every
  // element sums the cuts in the same order), so it may follow the threads.
  const bool by_rows = bf16 && shape.bt >= kBf16RowTiles;
  if (by_rows) parts = std::min<int64_t>((shape.bt + 1) / 2, std::max(4, threads));
  threads = static_cast<int>(std::min<int64_t>(threads, parts));
  std::shared_ptr<ApplyJob> job;
  std::vector<float> p, row_sums;
  try {
    job = std::make_shared<ApplyJob>();
    job->core = core;
    job->p_lo = precision != ApplyPrecision::kBf16;
    job->a = ApplyArgs{x, s_bits, t_bits, c, nullptr, nullptr, rows, m, n, w};
    job->parts = parts;
    if (bf16) {
      job->shape = shape;
      job->by_rows = by_rows;
      job->xv.resize(static_cast<size_t>(Bf16XvElems(shape)));
      for (int64_t k = 0; k < parts; ++k) {
        const auto [bt0, bt1] = by_rows ? job->RowTiles(k) : std::pair<int64_t, int64_t>{0, shape.bt};
        job->scratch.emplace_back(shape, bt1 - bt0);
      }
      job->ybuf.reset(new float[static_cast<size_t>((by_rows ? 1 : parts) * job->BufferFloats())]);
    } else {
      job->extra.assign(static_cast<size_t>((parts - 1) * job->BufferFloats()), 0.0f);
      p.resize(static_cast<size_t>(rows * w));
      row_sums.resize(static_cast<size_t>(rows));
      if (core == ApplyCore::kAvx512 && rows <= kLutMaxRows) {
        job->tables.resize(static_cast<size_t>(rows * ApplyTablesFloats(m)));
      }
    }
  } catch (const std::bad_alloc&) {
    return false;
  }
  if (bf16) {
    Bf16BuildXv(x, rows, m, job->shape, job->xv.data());
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < m; ++i) s += x[r * m + i];
      row_sums[r] = s;
    }
    std::fill(y, y + rows * n, 0.0f);
    job->a.p = p.data();
    job->a.row_sums = row_sums.data();
    if (!job->tables.empty()) ApplyBuildTablesAvx512(job->a, job->tables.data());
  }
  job->y = y;

  std::vector<std::thread> own;
  for (int t = 1; t < threads; ++t) {
    try {
      if (spawn) {
        spawn([job] { job->Work(); });
      } else {
        own.emplace_back([job] { job->Work(); });
      }
    } catch (...) {
      break;  // fewer workers: the caller claims what is left
    }
  }
  job->Work();
  // Every partition is claimed; wait for the ones other workers still run.
  while (job->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
  for (auto& th : own) th.join();

  const int64_t stride = job->BufferFloats();
  if (bf16) {
    // By cuts: y = Σ over partitions, in a fixed order, out of the tile-major
    // layout. (By rows the workers wrote y.)
    if (!by_rows) Bf16StoreRows(job->ybuf.get(), parts, stride, shape, 0, rows, n, y);
    return true;
  }
  // y = Σ_j p_j − 2·(Σ over partitions of the negative parts), in a fixed order.
  for (int64_t r = 0; r < rows; ++r) {
    float p_sum = 0.0f;
    for (int64_t j = 0; j < w; ++j) p_sum += p[r * w + j];
    float* yr = y + r * n;
    for (int64_t k = 1; k < parts; ++k) {
      const float* e = job->extra.data() + (k - 1) * stride + r * n;
      for (int64_t i = 0; i < n; ++i) yr[i] += e[i];
    }
    for (int64_t i = 0; i < n; ++i) yr[i] = p_sum - 2.0f * yr[i];
  }
  return true;
}

int UsableCpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace signedcut

namespace {

int64_t Prod(ffi::Span<const int64_t> dims, size_t upto) {
  int64_t p = 1;
  for (size_t i = 0; i < upto; ++i) p *= dims[i];
  return p;
}

// x (..., m); s_bits (..., w, ceil(m/32)); t_bits (..., w, ceil(n/32)); c (..., w);
// y (..., n). All leading dims are batch dims. The factors' leading dims (G
// matrices; size 1 when unbatched, as vmap_method="expand_dims" hands them
// over) split y's rows into G equal groups.
ffi::Error ApplyImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> s_bits,
                     ffi::Buffer<ffi::U32> t_bits, ffi::Buffer<ffi::F32> c,
                     ffi::ResultBuffer<ffi::F32> y, int32_t impl, int32_t precision,
                     ffi::ThreadPool pool) {
  if (precision < 0 || precision > 2)
    return ffi::Error::InvalidArgument(
        "signedcut_apply: precision must be 0 (default), 1 (highest) or 2 (bf16_bf16_f32), "
        "got " + std::to_string(precision));
  const auto prec = static_cast<signedcut::ApplyPrecision>(precision);
  const auto xd = x.dimensions(), sd = s_bits.dimensions(), td = t_bits.dimensions(),
             cd = c.dimensions(), yd = y->dimensions();
  if (xd.size() < 1 || yd.size() != xd.size() || sd.size() < 2 || td.size() != sd.size() ||
      cd.size() + 1 != sd.size())
    return ffi::Error::InvalidArgument(
        "signedcut_apply: expected x (..., m), s_bits (..., w, mw), t_bits (..., w, nw), "
        "c (..., w), y (..., n); got x " + signedcut::DimsToString(xd) + ", s_bits " + signedcut::DimsToString(sd) + ", t_bits " +
        signedcut::DimsToString(td) + ", c " + signedcut::DimsToString(cd) + ", y " + signedcut::DimsToString(yd));
  const int64_t m = xd.back(), n = yd.back(), w = sd[sd.size() - 2];
  const size_t fl = sd.size() - 2;  // factor leading dims
  for (size_t i = 0; i < fl; ++i)
    if (td[i] != sd[i] || cd[i] != sd[i])
      return ffi::Error::InvalidArgument("signedcut_apply: factor batch dims differ: s_bits " +
                                         signedcut::DimsToString(sd) + ", t_bits " + signedcut::DimsToString(td) + ", c " + signedcut::DimsToString(cd));
  if (sd.back() != (m + 31) / 32 || td.back() != (n + 31) / 32 || td[td.size() - 2] != w ||
      cd.back() != w)
    return ffi::Error::InvalidArgument(
        "signedcut_apply: factor shapes do not match m = " + std::to_string(m) + ", n = " +
        std::to_string(n) + ": s_bits " + signedcut::DimsToString(sd) + ", t_bits " + signedcut::DimsToString(td) + ", c " + signedcut::DimsToString(cd));
  // Rows of y are split into one group per factor matrix. x has either the
  // same rows as y or, when only the factors are batched (vmap hands x over
  // with size-1 leading dims), one group's rows shared by every group.
  const int64_t groups = Prod(sd, fl), xrows = Prod(xd, xd.size() - 1),
                yrows = Prod(yd, yd.size() - 1);
  if (groups == 0 || yrows % groups != 0)
    return ffi::Error::InvalidArgument("signedcut_apply: y batch " + signedcut::DimsToString(yd) +
                                       " is not a multiple of the factor batch " + signedcut::DimsToString(sd));
  const int64_t rows = yrows / groups;
  if (xrows != yrows && xrows != rows)
    return ffi::Error::InvalidArgument("signedcut_apply: x " + signedcut::DimsToString(xd) + " does not match y " +
                                       signedcut::DimsToString(yd) + " for factor batch " + signedcut::DimsToString(sd));
  const int64_t x_stride = xrows == yrows ? rows * m : 0;
  if (rows == 0 || m == 0 || n == 0) return ffi::Error::Success();
  std::string error;
  const signedcut::ApplyCore core = signedcut::ResolveApplyCore(
      static_cast<signedcut::ApplyCore>(impl), prec == signedcut::ApplyPrecision::kHighest, rows,
      rows * w * (m + n), &error);
  if (core == signedcut::ApplyCore::kAuto) return ffi::Error::InvalidArgument(error);
  // Helpers run on XLA's intra-op pool (the threads XLA's own ops use, which
  // otherwise sit spinning next to ours); the caller is one worker.
  const int threads = static_cast<int>(
      std::clamp<int64_t>(pool.num_threads(), 1, signedcut::UsableCpus()));
  const signedcut::TaskRunner spawn = [&pool](std::function<void()> task) {
    pool.Schedule(std::move(task));
  };
  for (int64_t g = 0; g < groups; ++g) {
    if (!signedcut::ApplySignedCut(x.typed_data() + g * x_stride,
                                   s_bits.typed_data() + g * w * sd.back(),
                                   t_bits.typed_data() + g * w * td.back(),
                                   c.typed_data() + g * w, y->typed_data() + g * rows * n, rows,
                                   m, n, w, core, threads, spawn, prec))
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "signedcut_apply: could not allocate the (rows, w) scratch");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SignedCutApply, ApplyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., m) activations
                                  .Arg<ffi::Buffer<ffi::U32>>()  // s_bits (..., w, ceil(m/32))
                                  .Arg<ffi::Buffer<ffi::U32>>()  // t_bits (..., w, ceil(n/32))
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c (..., w) scales
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (..., n)
                                  .Attr<int32_t>("impl")   // 0 auto, 1 scalar, 2 avx512,
                                                           // 3 avx512_bf16, 4 amx
                                  .Attr<int32_t>("precision")  // ApplyPrecision: 0 default,
                                                               // 1 highest (auto: f32 cores
                                                               // only), 2 bf16_bf16_f32
                                  .Ctx<ffi::ThreadPool>());
