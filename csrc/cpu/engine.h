// The CPU TBPTT(k1, k2) engine: the only code with a time loop.
//
// Schedule. run() cuts the data into chunks that end at update points (k1
// steps after the previous update) and processes each chunk layer-major:
// layer l's input projection for the whole chunk is one GEMM (two when the
// chunk wraps the ring) written straight into the ring's gate slots, then a
// per-step loop does h W_hh^T plus one fused pointwise pass (the cell); the
// readout of the chunk is one GEMM and the loss + dL/dy one fused pass.
// An update at step t runs the backward over its window (w, t] layer by
// layer from the top: a per-step reverse loop (pointwise pass + dG W_hh),
// then each weight gradient over the window is one GEMM per ring segment,
// and the gradient sent to the layer below is one GEMM. Gradient checks,
// clipping and the optimizer are one fused pass per parameter array.
// Memory is O(K) in steps (ring + window workspace), independent of T.
#pragma once

#include <memory>
#include <vector>

#include "tbptt/engine_api.h"

namespace tbptt::cpu {

// Builds the engine for cfg.dtype / cfg.cell. params: see make_cpu_engine.
std::unique_ptr<EngineBase> make_engine(const Config& cfg, const std::vector<void*>& params);

}  // namespace tbptt::cpu
