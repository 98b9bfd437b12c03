// A minimal harness for the host tests of csrc/cuda/tile_plan.h: CHECK counts checks and
// failures and prints the first failures with their context; main returns report().
#pragma once

#include <cstdarg>
#include <cstdio>

namespace host_check {

inline long checks = 0, failures = 0;
constexpr long kPrinted = 20;

inline void fail(const char* file, int line, const char* expr, const char* fmt, ...) {
  if (++failures > kPrinted) return;
  std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", file, line, expr);
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fputc('\n', stderr);
}

// Exit status of the test program: 0 iff every check held.
inline int report(const char* name) {
  std::printf("%s: %ld checks, %ld failed\n", name, checks, failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace host_check

// CHECK(condition, printf-style context): the context says which case failed.
#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++host_check::checks;                                                  \
    if (!(cond)) host_check::fail(__FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)
