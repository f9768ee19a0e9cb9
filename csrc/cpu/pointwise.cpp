// The cells' per-element math (cells/*.h) as one loop nest per step, for
// every cell of the registry. The bodies and the activations (vmath.h) are
// always_inline, so each ISA clone of a float pass is one vectorised loop
// nest; double keeps libm activations (float64 accuracy) and needs no clones.
#include "cpu/pointwise.h"

#include "cpu/vmath.h"

namespace tbptt::cpu {
namespace {

// The activations the cells call, on the CPU.
struct CpuMath {
  template <typename T>
  TBPTT_INLINE static T sigmoid(T x) {
    return vmath::sigmoid(x);
  }
  template <typename T>
  TBPTT_INLINE static T tanh(T x) {
    return vmath::tanh(x);
  }
};

template <typename Cell, typename T>
TBPTT_INLINE void forward_rows(const cells::StepFwd<T>& s) {
  const int64_t h = s.hidden;
  for (int64_t b = 0; b < s.batch; ++b) {
    const cells::Fwd<T> r = s.row(b);
    TBPTT_IVDEP
    for (int64_t j = 0; j < h; ++j) Cell::template forward<CpuMath>(r, h, j);
  }
}

// kCarry: the carry buffers hold the gradient from step s+1 (a template flag
// so the loop has no branch and vectorises).
template <typename Cell, bool kCarry, typename T>
TBPTT_INLINE void backward_rows(const cells::StepBwd<T>& s) {
  const int64_t h = s.hidden;
  for (int64_t b = 0; b < s.batch; ++b) {
    const cells::Bwd<T> r = s.row(b);
    TBPTT_IVDEP
    for (int64_t j = 0; j < h; ++j) Cell::template backward<kCarry>(r, h, j);
  }
}

}  // namespace

#define TBPTT_CPU_POINTWISE_DEF(name, Type)                                               \
  TBPTT_CLONES void forward_pass(Type, const cells::StepFwd<float>& s) {                  \
    forward_rows<Type>(s);                                                                \
  }                                                                                       \
  void forward_pass(Type, const cells::StepFwd<double>& s) {                              \
    forward_rows<Type>(s);                                                                \
  }                                                                                       \
  TBPTT_CLONES void backward_pass(Type, const cells::StepBwd<float>& s, bool has_carry) { \
    has_carry ? backward_rows<Type, true>(s) : backward_rows<Type, false>(s);             \
  }                                                                                       \
  void backward_pass(Type, const cells::StepBwd<double>& s, bool has_carry) {             \
    has_carry ? backward_rows<Type, true>(s) : backward_rows<Type, false>(s);             \
  }
TBPTT_CELLS(TBPTT_CPU_POINTWISE_DEF)
#undef TBPTT_CPU_POINTWISE_DEF

}  // namespace tbptt::cpu
