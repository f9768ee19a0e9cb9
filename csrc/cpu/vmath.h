// Elementwise activations over contiguous arrays, the hot part of every
// cell step. float versions use a vectorisable Cephes-style exp/tanh (about
// 2 ulp) compiled for several x86-64 levels and picked at run time
// (target_clones), so no CPU feature is required at build or load time;
// double versions use libm (the float64 contract is 1e-10 relative).
// In-place forms take one array; the two-array forms need x, y disjoint.
#pragma once

#include <cstdint>

namespace tbptt::cpu::vmath {

void sigmoid(float* x, int64_t n);  // in place
void sigmoid(double* x, int64_t n);
void tanh(float* x, int64_t n);  // in place
void tanh(double* x, int64_t n);
void tanh(const float* x, float* y, int64_t n);  // y = tanh(x), disjoint
void tanh(const double* x, double* y, int64_t n);

}  // namespace tbptt::cpu::vmath
