// A minimal test harness: CHECK records a failure and goes on; main returns the failure count.
#pragma once

#include <cstdio>
#include <string>

namespace test {
inline int failures = 0;
inline int checks = 0;
inline std::string show(const std::string& v) { return "\"" + v + "\""; }
template <typename T>
std::string show(const T& v) { return std::to_string(v); }
}  // namespace test

#define CHECK(cond)                                                                  \
    do {                                                                             \
        ++test::checks;                                                              \
        if (!(cond)) {                                                               \
            ++test::failures;                                                        \
            std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_EQ(a, b)                                                                            \
    do {                                                                                          \
        ++test::checks;                                                                           \
        const auto va_ = (a);                                                                     \
        const auto vb_ = (b);                                                                     \
        if (!(va_ == vb_)) {                                                                      \
            ++test::failures;                                                                     \
            std::fprintf(stderr, "%s:%d: CHECK_EQ(%s, %s) failed: %s vs %s\n", __FILE__, __LINE__, #a, #b, \
                         test::show(va_).c_str(), test::show(vb_).c_str());               \
        }                                                                                         \
    } while (0)

#define CHECK_CONTAINS(text, part)                                                                   \
    do {                                                                                             \
        ++test::checks;                                                                              \
        const std::string t_ = (text);                                                               \
        if (t_.find(part) == std::string::npos) {                                                    \
            ++test::failures;                                                                        \
            std::fprintf(stderr, "%s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__, t_.c_str(), part); \
        }                                                                                            \
    } while (0)

inline int finish(const char* name) {
    std::printf("%s: %d checks, %d failed\n", name, test::checks, test::failures);
    return test::failures ? 1 : 0;
}
