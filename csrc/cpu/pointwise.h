// The cells' pointwise passes over one step (all B rows) on the CPU: one
// overload per cell (cells/registry.h) and dtype, defined in pointwise.cpp,
// where the float versions are compiled once per x86-64 ISA level
// (TBPTT_CLONES in vmath.h) and picked at run time.
#pragma once

#include "cells/cell.h"
#include "cells/registry.h"

namespace tbptt::cpu {

#define TBPTT_CPU_POINTWISE_DECL(name, Type)                                \
  void forward_pass(Type, const cells::StepFwd<float>& s);                  \
  void forward_pass(Type, const cells::StepFwd<double>& s);                 \
  void backward_pass(Type, const cells::StepBwd<float>& s, bool has_carry); \
  void backward_pass(Type, const cells::StepBwd<double>& s, bool has_carry);
TBPTT_CELLS(TBPTT_CPU_POINTWISE_DECL)
#undef TBPTT_CPU_POINTWISE_DECL

}  // namespace tbptt::cpu
