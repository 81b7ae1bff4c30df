// nanobind module exposing the XLA FFI handlers to Python as a dict of
// PyCapsules, registered once at import by jax_signedcut/_ffi.py.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "xla/ffi/api/ffi.h"
#include "kernel.h"

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" XLA_FFI_Error* SignedCutGreedy(XLA_FFI_CallFrame* call_frame);
// --- issue 5: packed-apply kernel (xla_ffi/apply_ffi.cc) ---
extern "C" XLA_FFI_Error* SignedCutApply(XLA_FFI_CallFrame* call_frame);
// --- end issue 5 ---

NB_MODULE(_signedcut_ffi, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["signedcut_greedy"] = nb::capsule(reinterpret_cast<void*>(&SignedCutGreedy));
    // --- issue 5: packed-apply kernel ---
    d["signedcut_apply"] = nb::capsule(reinterpret_cast<void*>(SignedCutApply));
    // --- end issue 5 ---
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
#ifdef SIGNEDCUT_JAXLIB_VERSION
  m.attr("built_with_jaxlib") = SIGNEDCUT_JAXLIB_VERSION;
#endif
  m.attr("ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}
