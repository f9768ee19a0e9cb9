// Device discovery for the CUDA backend.
#pragma once

namespace tbptt::cuda {

// Throws std::runtime_error naming the CUDA backend and the reason when no
// usable GPU (or no cuBLAS) is present; returns the current device id.
int require_device();

}  // namespace tbptt::cuda
