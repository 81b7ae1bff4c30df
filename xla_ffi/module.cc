// nanobind module exposing the XLA FFI handlers to Python as a dict of
// PyCapsules, registered once at import by jax_signedcut/_ffi.py.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

// --- issue 5: packed-apply kernel (xla_ffi/apply_ffi.cc) ---
extern "C" XLA_FFI_Error* SignedCutApply(XLA_FFI_CallFrame* call_frame);
// --- end issue 5 ---

NB_MODULE(_signedcut_ffi, m) {
  m.def("registrations", []() {
    nb::dict d;
    // --- issue 5: packed-apply kernel ---
    d["signedcut_apply"] = nb::capsule(reinterpret_cast<void*>(SignedCutApply));
    // --- end issue 5 ---
    return d;
  });
}
