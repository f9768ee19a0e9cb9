// Device discovery for the CUDA backend.
#pragma once

#include <string>

namespace tbptt::cuda {

// Throws std::runtime_error naming the CUDA backend and the reason when no
// usable GPU (or no cuBLAS) is present; returns the current device id.
int require_device();

// Whether this build's kernels can run on the current device (a build for
// sm_90 cannot run on older GPUs); why: the runtime's answer when not.
bool kernels_run_here(std::string* why);

}  // namespace tbptt::cuda
