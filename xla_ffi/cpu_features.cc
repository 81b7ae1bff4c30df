// The CPU probe and environment policy of cpu_features.h.
#include "cpu_features.h"

#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <deque>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace signedcut {
namespace {

CpuFeatures Probe() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the AVX-512 state.
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2");
  f.avx512bw = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1u;
  if (f.avx512 && __get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.amx_bf16 = ((d >> 22) & 1u) && ((d >> 24) & 1u);  // AMX-BF16, AMX-TILE
  }
#endif
  return f;
}

struct AmxState {
  bool usable = false;
  std::string why;
};

AmxState RequestAmx() {
  AmxState s;
  if (!Cpu().amx_bf16) {
    s.why = "this CPU has no AMX-BF16";
    return s;
  }
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023;  // <asm/prctl.h>
  constexpr long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    s.why = "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
    return s;
  }
  s.usable = true;
#else
  s.why = "AMX is only enabled on Linux x86-64";
#endif
  return s;
}

}  // namespace

const CpuFeatures& Cpu() {
  static const CpuFeatures f = Probe();
  return f;
}

bool AmxUsable(std::string* why) {
  static const AmxState s = RequestAmx();  // once per process, thread-safe
  if (!s.usable && why != nullptr) *why = s.why;
  return s.usable;
}

const std::string& EnvChoice(const char* name) {
  static std::mutex mu;
  // A deque keeps earlier entries in place, so the references handed out stay
  // valid; never freed, as a reference may be used at exit.
  static auto* cache = new std::deque<std::pair<std::string, std::string>>();
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& kv : *cache) {
    if (kv.first == name) return kv.second;
  }
  const char* v = std::getenv(name);
  cache->emplace_back(name, v == nullptr ? "" : v);
  return cache->back().second;
}

}  // namespace signedcut
