// nanobind module exposing the XLA FFI handlers to Python as a dict of
// PyCapsules, registered once at import by jax_signedcut/_ffi.py.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "xla/ffi/api/ffi.h"
#include "apply_kernel.h"
#include "cpu_features.h"
#include "kernel.h"

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" XLA_FFI_Error* SignedCutGreedy(XLA_FFI_CallFrame* call_frame);  // ffi.cc
extern "C" XLA_FFI_Error* SignedCutApply(XLA_FFI_CallFrame* call_frame);   // apply_ffi.cc
extern "C" XLA_FFI_Error* SignedCutHcutSearch(XLA_FFI_CallFrame* call_frame);  // hcut_search.cc
extern "C" XLA_FFI_Error* SignedCutHcutBackfit(XLA_FFI_CallFrame* call_frame);  // hcut_search.cc

NB_MODULE(_signedcut_ffi, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["signedcut_greedy"] = nb::capsule(reinterpret_cast<void*>(&SignedCutGreedy));
    d["signedcut_apply"] = nb::capsule(reinterpret_cast<void*>(SignedCutApply));
    d["signedcut_hcut_search"] = nb::capsule(reinterpret_cast<void*>(SignedCutHcutSearch));
    d["signedcut_hcut_backfit"] = nb::capsule(reinterpret_cast<void*>(SignedCutHcutBackfit));
    return d;
  });
  m.def(
      "kernel_name",
      [](int impl) {
        std::string error;
        const signedcut::Kernels* k =
            signedcut::SelectKernels(static_cast<signedcut::Impl>(impl), &error);
        if (k == nullptr) throw nb::value_error(error.c_str());
        return std::string(k->name);
      },
      nb::arg("impl") = 0,
      "Name of the kernel implementation `impl` (0 auto, 1 scalar, 2 avx512) resolves to.");
  m.def("cuts_done", &signedcut::CutsDone,
        "Cuts recorded by the greedy kernel in this process so far (for progress bars).");
  m.def("avx512_supported", &signedcut::Avx512Supported,
        "Whether this CPU runs the AVX-512 kernel.");
  m.def(
      "apply_core_name",
      [](int impl, bool exact, int64_t rows, int64_t work) {
        std::string error;
        const signedcut::ApplyCore core = signedcut::ResolveApplyCore(
            static_cast<signedcut::ApplyCore>(impl), exact, rows, work, &error);
        if (core == signedcut::ApplyCore::kAuto) throw nb::value_error(error.c_str());
        return std::string(signedcut::ApplyCoreName(core));
      },
      nb::arg("impl") = 0, nb::arg("exact") = false, nb::arg("rows") = 64,
      nb::arg("work") = int64_t{1} << 40,
      "The apply core a call with this `impl` (0 auto, 1 scalar, 2 avx512, 3 avx512_bf16, "
      "4 amx), `exact` flag, number of rows and work rows·w·(m + n) runs.");
  {
    nb::dict rows;
    rows["amx"] = signedcut::Bf16MinRows(signedcut::ApplyCore::kAmx);
    rows["avx512_bf16"] = signedcut::Bf16MinRows(signedcut::ApplyCore::kAvx512Bf16);
    m.attr("bf16_min_rows") = rows;
  }
  m.attr("bf16_min_work") = signedcut::kBf16MinWork;
  m.def(
      "cpu_features",
      []() {
        const signedcut::CpuFeatures& f = signedcut::Cpu();
        std::string why;
        const bool amx = signedcut::AmxUsable(&why);
        nb::dict d;
        d["avx512"] = f.avx512;
        d["avx512bw"] = f.avx512bw;
        d["avx512_bf16"] = f.avx512_bf16;
        d["amx_bf16"] = f.amx_bf16;
        d["amx_usable"] = amx;
        d["amx_why_not"] = why;
        return d;
      },
      "What this CPU and OS let the kernels use (AMX: whether Linux granted the tile state).");
#ifdef SIGNEDCUT_JAXLIB_VERSION
  m.attr("built_with_jaxlib") = SIGNEDCUT_JAXLIB_VERSION;
#endif
  m.attr("ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}
