// Config helpers: canonical parameter shapes/names and range checks.
#include "tbptt/config.h"

#include "tbptt/errors.h"

namespace tbptt {

int64_t Config::gates() const {
#define TBPTT_CELL_GATES(name, Type) \
  case CellKind::name:               \
    return Type::kGates;
  switch (cell) { TBPTT_CELLS(TBPTT_CELL_GATES) }
#undef TBPTT_CELL_GATES
  return 1;
}

int64_t Config::state_per_layer() const {
#define TBPTT_CELL_STATES(name, Type) \
  case CellKind::name:                \
    return Type::kStates;
  switch (cell) { TBPTT_CELLS(TBPTT_CELL_STATES) }
#undef TBPTT_CELL_STATES
  return 1;
}

std::vector<int64_t> Config::param_shape(int64_t i) const {
  if (embedded() && i == 0) return {vocab_size, input_size};
  i -= embedded();
  const int64_t gh = gates() * hidden_size;
  if (i >= 4 * num_layers) {
    if (i == 4 * num_layers) return {output_size, hidden_size};
    return {output_size};
  }
  const int64_t layer = i / 4;
  switch (i % 4) {
    case 0:
      return {gh, layer == 0 ? input_size : hidden_size};
    case 1:
      return {gh, hidden_size};
    default:
      return {gh};
  }
}

std::vector<int64_t> Config::param_offsets() const {
  std::vector<int64_t> off{0};
  for (int64_t i = 0; i < num_params(); ++i) off.push_back(off.back() + param_size(i));
  return off;
}

int64_t Config::param_size(int64_t i) const {
  int64_t n = 1;
  for (int64_t d : param_shape(i)) n *= d;
  return n;
}

std::string Config::param_name(int64_t i) const {
  if (embedded() && i == 0) return "embedding.weight";
  i -= embedded();
  if (i == 4 * num_layers) return "readout.weight";
  if (i == 4 * num_layers + 1) return "readout.bias";
  static const char* kNames[4] = {"weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l"};
  return str_cat(kNames[i % 4], i / 4);
}

void Config::validate() const {
  TBPTT_CHECK_ARG(input_size >= 1, "input_size must be >= 1, got ", input_size);
  TBPTT_CHECK_ARG(hidden_size >= 1, "hidden_size must be >= 1, got ", hidden_size);
  TBPTT_CHECK_ARG(output_size >= 1, "output_size must be >= 1, got ", output_size);
  TBPTT_CHECK_ARG(num_layers >= 1, "num_layers must be >= 1, got ", num_layers);
  TBPTT_CHECK_ARG(k1 >= 1, "k1 must be >= 1, got ", k1);
  TBPTT_CHECK_ARG(k2 >= 0, "k2 must be >= 1 (or 0 for unbounded), got ", k2);
  TBPTT_CHECK_ARG(capacity >= 0, "capacity must be >= 0, got ", capacity);
  TBPTT_CHECK_ARG(vocab_size >= 0, "vocab_size must be >= 0 (0: no embedding), got ", vocab_size);
  if (capacity > 0 && !unbounded()) {
    const int64_t need = k1 > k2 ? k1 : k2;
    TBPTT_CHECK_ARG(capacity >= need, "capacity must be >= max(k1, k2) = ", need, ", got ",
                    capacity);
  }
  TBPTT_CHECK_ARG(lr >= 0.0, "lr must be >= 0, got ", lr);
  TBPTT_CHECK_ARG(momentum >= 0.0, "momentum must be >= 0, got ", momentum);
  TBPTT_CHECK_ARG(!(nesterov && momentum <= 0.0), "nesterov requires momentum > 0");
  TBPTT_CHECK_ARG(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TBPTT_CHECK_ARG(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TBPTT_CHECK_ARG(eps >= 0.0, "eps must be >= 0, got ", eps);
  TBPTT_CHECK_ARG(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
}

}  // namespace tbptt
