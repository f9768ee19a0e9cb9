# CUDA engine settings, included by the top-level CMakeLists.txt (CUDA hook)
# after enable_language(CUDA), with the target _core defined. Adds the
# csrc/cuda sources, TBPTT_WITH_CUDA, the architectures and the flags.
#
# cuBLAS is NOT linked: csrc/cuda/cublas.cpp dlopens libcublas.so.13 at run
# time (so _core imports, and the CPU engine works, without cuBLAS or a GPU).
# Only its headers are needed here, from the nvidia-cublas wheel (the `cuda`
# extra) found through Python, or from a full CUDA toolkit. The CUDA runtime
# is linked statically: it loads the driver lazily.
#
# Without cuBLAS headers: TBPTT_CUDA=ON fails, AUTO builds without CUDA.

find_package(CUDAToolkit REQUIRED)

# The nvidia-cublas wheel's cu13 root (include/, lib/). The second try uses -E
# to see the base environment from inside pip's isolated build environment.
set(_tbptt_find_wheel [=[
import importlib.util, os
try:
    spec = importlib.util.find_spec("nvidia.cu13")
except ImportError:
    spec = None
for root in (spec.submodule_search_locations if spec else None) or []:
    if os.path.isfile(os.path.join(root, "include", "cublas_v2.h")):
        print(root)
        break
]=])
set(TBPTT_CUBLAS_ROOT "" CACHE PATH "nvidia-cublas wheel root (nvidia/cu13); found via Python if empty")
if(NOT TBPTT_CUBLAS_ROOT)
  foreach(_flags "" "-E")
    execute_process(COMMAND "${Python_EXECUTABLE}" ${_flags} -c "${_tbptt_find_wheel}"
                    OUTPUT_VARIABLE _root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_root)
      set(TBPTT_CUBLAS_ROOT "${_root}")
      break()
    endif()
  endforeach()
endif()
find_path(TBPTT_CUBLAS_INCLUDE_DIR cublas_v2.h
          HINTS "${TBPTT_CUBLAS_ROOT}/include" ${CUDAToolkit_INCLUDE_DIRS}
          NO_CACHE)
if(NOT TBPTT_CUBLAS_INCLUDE_DIR)
  if(TBPTT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "TBPTT_CUDA=ON but cublas_v2.h was not found: pip install nvidia-cublas "
                        "(and build with --no-build-isolation), or pass -DTBPTT_CUBLAS_ROOT=...")
  endif()
  message(STATUS "tbptt_fast: no cuBLAS headers (pip install nvidia-cublas); building without CUDA")
  set(TBPTT_WITH_CUDA OFF)
  return()
endif()
message(STATUS "tbptt_fast: cuBLAS headers ${TBPTT_CUBLAS_INCLUDE_DIR}")

# Hopper (H100/H200) machine code plus its PTX (CMake's "90" = 90-real + 90-virtual).
set(TBPTT_CUDA_ARCHITECTURES "90" CACHE STRING "CUDA architectures of the engine, CMake syntax (e.g. 80;90)")
set_property(TARGET _core PROPERTY CUDA_ARCHITECTURES ${TBPTT_CUDA_ARCHITECTURES})
set_property(TARGET _core PROPERTY CUDA_STANDARD 17)
set_property(TARGET _core PROPERTY CUDA_RUNTIME_LIBRARY Static)
message(STATUS "tbptt_fast: CUDA architectures ${TBPTT_CUDA_ARCHITECTURES}")

file(GLOB _tbptt_cuda_sources CONFIGURE_DEPENDS "${CMAKE_CURRENT_LIST_DIR}/*.cu"
     "${CMAKE_CURRENT_LIST_DIR}/*.cpp")
target_sources(_core PRIVATE ${_tbptt_cuda_sources})
target_compile_definitions(_core PRIVATE TBPTT_WITH_CUDA)
set_source_files_properties(${_tbptt_cuda_sources} PROPERTIES COMPILE_DEFINITIONS
                            "TBPTT_CUBLAS_HINT_DIR=\"${TBPTT_CUBLAS_ROOT}/lib\"")
# Only the cublas*.h headers: the wheel's include/ also holds a CUDA runtime's
# headers of its own version, which must not shadow the compiler's.
file(GLOB _tbptt_cublas_headers "${TBPTT_CUBLAS_INCLUDE_DIR}/cublas*.h")
file(COPY ${_tbptt_cublas_headers} DESTINATION "${CMAKE_CURRENT_BINARY_DIR}/tbptt_cublas_include")
target_include_directories(_core PRIVATE "${CMAKE_CURRENT_BINARY_DIR}/tbptt_cublas_include")
target_link_libraries(_core PRIVATE CUDA::cudart_static ${CMAKE_DL_LIBS})
target_compile_options(_core PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-fvisibility=hidden>)
if(TBPTT_WERROR)
  target_compile_options(_core PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Werror>)
endif()
