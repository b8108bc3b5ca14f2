// A minimal check macro for the unit tests (exit status 1 on the first failure).
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

#define CHECK_NEAR(a, b, rel)                                                                              \
  do {                                                                                                     \
    double _a = (a), _b = (b);                                                                             \
    if (!(std::fabs(_a - _b) <= (rel) * std::fmax(std::fabs(_b), 1e-30))) {                                \
      std::fprintf(stderr, "%s:%d: %s = %.9g, expected %.9g (rel %g)\n", __FILE__, __LINE__, #a, _a, _b, (double)(rel)); \
      std::exit(1);                                                                                        \
    }                                                                                                      \
  } while (0)

#define CHECK_THROWS(stmt, code_)                                               \
  do {                                                                          \
    bool _thrown = false;                                                       \
    try {                                                                       \
      stmt;                                                                     \
    } catch (const rd::Error& e) {                                              \
      _thrown = e.code == (code_);                                              \
      if (!_thrown) std::fprintf(stderr, "wrong error: %s\n", e.what());        \
    }                                                                           \
    if (!_thrown) {                                                             \
      std::fprintf(stderr, "%s:%d: expected an error from %s\n", __FILE__, __LINE__, #stmt); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)
