// The engine configuration and its rules: the one place in C++ where the
// window rule, the ring capacity and the parameter layout are written.
//
// Shape legend (used by every header under csrc/):
//   T  steps in one run() call           B  batch size
//   D  input size (D_0 = D, D_l = H for l > 0)
//   H  hidden size                        O  readout (output) size
//   G  gates of the cell (cells/registry.h): 1 rnn_tanh/rnn_relu,
//      4 lstm (i,f,g,o), 3 gru (r,z,n), 3 cifg (f,g,o)
//   L  number of layers                   K  ring capacity in steps
//   P  number of parameter arrays = 4L + 2
// All arrays are row-major (rightmost index fastest), C-contiguous, with no
// padding, in the engine's dtype unless stated otherwise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cells/registry.h"

namespace tbptt {

// The cells of cells/registry.h, in registry order: CellKind::lstm, ...
#define TBPTT_CELL_ENUM(name, Type) name,
enum class CellKind { TBPTT_CELLS(TBPTT_CELL_ENUM) };
#undef TBPTT_CELL_ENUM
enum class LossKind { kMse, kCrossEntropy };
enum class OverlapKind { kStored, kRecompute };
// kExternal: the engine computes each update's gradient and leaves the step
// to the caller (RunInputs::on_update reads grad_data(); the PyTorch bridge).
enum class OptimizerKind { kSgd, kAdam, kExternal };
enum class DType { kFloat32, kFloat64 };

// The optimizer's hyperparameters (Config's fields of the same names): what
// may change between calls (EngineBase::set_hyperparams).
struct Hyperparams {
  OptimizerKind optimizer = OptimizerKind::kSgd;
  double lr = 0.01, momentum = 0.0;
  bool nesterov = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

// Engine configuration; python/tbptt_fast/_config.py (EngineConfig) builds the
// dict the bindings read into it.
struct Config {
  CellKind cell = CellKind::lstm;
  int64_t input_size = 0;   // D
  int64_t hidden_size = 0;  // H
  int64_t output_size = 0;  // O
  int64_t num_layers = 1;   // L
  DType dtype = DType::kFloat32;
  int64_t k1 = 1;
  int64_t k2 = 1;  // 0 = unbounded (window reaches back to the last reset)
  LossKind loss = LossKind::kMse;
  OverlapKind overlap = OverlapKind::kStored;
  OptimizerKind optimizer = OptimizerKind::kSgd;
  double lr = 0.01;
  double momentum = 0.0;
  bool nesterov = false;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double clip = 0.0;       // <= 0: no clipping
  int64_t capacity = 0;    // ring capacity override in steps; 0 = max(k1, k2)
  int64_t vocab_size = 0;  // V > 0: token inputs through embedding.weight [V, D]; 0: float inputs

  // The window rule: the gradient of the update at step t (previous update at
  // t_prev, 0 if none) flows back through steps (w, t]. The one place this
  // rule is written in C++.
  int64_t window_start(int64_t t, int64_t t_prev) const {
    if (unbounded()) return 0;
    const int64_t overlap = k2 > k1 ? k2 - k1 : 0;
    int64_t w = t - k2 > t_prev - overlap ? t - k2 : t_prev - overlap;
    return w > 0 ? w : 0;
  }
  // Steps of history a ring holds: max(k1, k2), or the test override
  // `capacity` (never below k1, since a block must fit). Grows when unbounded.
  int64_t ring_capacity() const {
    const int64_t need = k1 > k2 ? k1 : k2;
    return capacity > 0 ? (capacity > k1 ? capacity : k1) : need;
  }
  // Steps of history held after `count` steps since the last reset.
  int64_t history_steps(int64_t count) const {
    if (unbounded()) return count;
    const int64_t need = k1 > k2 ? k1 : k2;
    return count < need ? count : need;
  }
  int64_t gates() const;  // G of the cell (registry)
  bool unbounded() const { return k2 == 0; }
  // Number of parameter arrays, 4L + 2 (+ 1 with an embedding), in canonical
  // order: embedding.weight [V, D] if vocab_size > 0; for l in 0..L-1:
  // weight_ih_l{l} [G*H, D_l], weight_hh_l{l} [G*H, H], bias_ih_l{l} [G*H],
  // bias_hh_l{l} [G*H]; then readout.weight [O, H], readout.bias [O].
  int64_t num_params() const { return embedded() + 4 * num_layers + 2; }
  int64_t embedded() const { return vocab_size > 0 ? 1 : 0; }
  // Index of layer l's parameter k (0 w_ih, 1 w_hh, 2 b_ih, 3 b_hh), of the
  // readout's k (0 weight, 1 bias).
  int64_t layer_param(int64_t l, int64_t k) const { return embedded() + 4 * l + k; }
  int64_t readout_param(int64_t k) const { return embedded() + 4 * num_layers + k; }
  std::vector<int64_t> param_shape(int64_t i) const;
  int64_t param_size(int64_t i) const;  // product of param_shape(i)
  // [P + 1] start of each parameter in one flat buffer of all of them, in
  // canonical order; the last entry is the total size.
  std::vector<int64_t> param_offsets() const;
  std::string param_name(int64_t i) const;
  // State arrays per layer: 2 for cells with a cell state (h, c), else 1 (h); each [B, H].
  int64_t state_per_layer() const;
  size_t dtype_size() const { return dtype == DType::kFloat32 ? 4 : 8; }
  Hyperparams hyperparams() const {
    return {optimizer, lr, momentum, nesterov, beta1, beta2, eps, weight_decay};
  }
  void set_hyperparams(const Hyperparams& hp) {
    optimizer = hp.optimizer;
    lr = hp.lr;
    momentum = hp.momentum;
    nesterov = hp.nesterov;
    beta1 = hp.beta1;
    beta2 = hp.beta2;
    eps = hp.eps;
    weight_decay = hp.weight_decay;
  }
  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

}  // namespace tbptt
