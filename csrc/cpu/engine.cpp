// The CPU engine: the engine skeleton (tbptt/engine.h) on the CPU device
// policy (cpu/device.h), one instantiation per dtype and registry cell.
#include "tbptt/engine.h"

#include <memory>
#include <stdexcept>

#include "cells/registry.h"
#include "cpu/device.h"

namespace tbptt {
namespace {

template <typename T>
std::unique_ptr<EngineBase> make_typed(const Config& cfg, const std::vector<void*>& params) {
#define TBPTT_CPU_ENGINE_CASE(name, Type) \
  case CellKind::name:                    \
    return std::make_unique<Engine<T, cpu::Device<T>, Type>>(cfg, params);
  switch (cfg.cell) { TBPTT_CELLS(TBPTT_CPU_ENGINE_CASE) }
#undef TBPTT_CPU_ENGINE_CASE
  throw std::invalid_argument("unknown cell");
}

}  // namespace

std::unique_ptr<EngineBase> make_cpu_engine(const Config& cfg, const std::vector<void*>& params) {
  if (cfg.dtype == DType::kFloat64) return make_typed<double>(cfg, params);
  return make_typed<float>(cfg, params);
}

}  // namespace tbptt
