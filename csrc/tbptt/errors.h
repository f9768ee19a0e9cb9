// Error helpers shared by every backend. Native code throws
// std::invalid_argument for bad arguments (ValueError in Python) and
// std::runtime_error for failures while running (RuntimeError in Python).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tbptt {

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// A non-finite loss or gradient in an update (tbptt_fast.NonFiniteError in
// Python, registered by the bindings). The engine raises it after marking the
// block consumed and before touching parameters or optimizer state.
class NonFiniteError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Memory that cannot be had (tbptt_fast: MemoryError with this message);
// raised before anything changed.
class MemoryLimitError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace tbptt

// TBPTT_CHECK_ARG(cond, msg parts...): throws std::invalid_argument.
#define TBPTT_CHECK_ARG(cond, ...)                                           \
  do {                                                                       \
    if (!(cond)) throw std::invalid_argument(::tbptt::str_cat(__VA_ARGS__)); \
  } while (0)

// TBPTT_CHECK_RT(cond, msg parts...): throws std::runtime_error.
#define TBPTT_CHECK_RT(cond, ...)                                         \
  do {                                                                    \
    if (!(cond)) throw std::runtime_error(::tbptt::str_cat(__VA_ARGS__)); \
  } while (0)
