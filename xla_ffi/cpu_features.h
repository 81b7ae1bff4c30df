// What this CPU (and OS) lets the kernels use, probed once, and the one
// environment-variable policy every kernel family follows (simdjson-style):
// an implementation is chosen once per process, at first use, as the value of
// the family's variable if it is set and not "auto", else the best one the
// CPU supports; a per-call implementation argument overrides both (that is how
// the tests run every implementation in one process).
//
// The greedy reads JAX_SIGNEDCUT_KERNEL (dispatch.cc), the packed apply reads
// JAX_SIGNEDCUT_APPLY_IMPL (apply_ffi.cc).
#ifndef JAX_SIGNEDCUT_XLA_FFI_CPU_FEATURES_H_
#define JAX_SIGNEDCUT_XLA_FFI_CPU_FEATURES_H_

#include <string>

namespace signedcut {

struct CpuFeatures {
  // AVX-512 F, BW, VL, DQ, VPOPCNTDQ + FMA, POPCNT, BMI2: the greedy's
  // AVX-512 table and the apply's f32 AVX-512 cores.
  bool avx512 = false;
  // AVX-512 F and BW: the apply's f32 AVX-512 cores.
  bool avx512bw = false;
  // AVX512_BF16 (vdpbf16ps) with `avx512` (the bf16 apply paths' layout code
  // needs BMI2 and AVX-512 BW).
  bool avx512_bf16 = false;
  // AMX-TILE and AMX-BF16 reported by CPUID (the OS permission is separate:
  // AmxUsable()).
  bool amx_bf16 = false;
};

// The probe, run once (thread-safe).
const CpuFeatures& Cpu();

// Whether AMX tiles may be used by this process: the CPU has them and Linux
// granted the tile data state (arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), requested once per process). False, never an error,
// when refused; `why` (if not null) then says why.
bool AmxUsable(std::string* why = nullptr);

// The value of environment variable `name`, read once per name and process
// ("" if unset). Only a few fixed names are used, so the cache stays small.
const std::string& EnvChoice(const char* name);

}  // namespace signedcut

#endif  // JAX_SIGNEDCUT_XLA_FFI_CPU_FEATURES_H_
