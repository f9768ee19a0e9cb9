// The engine's own per-step GEMM kernel: see own_gemm.h. Measured single
// thread, AVX-512 EPYC: [8 x 1024 x 256] 44 us vs OpenBLAS 157 us,
// [32 x 256 x 1024] 144 vs 206 us, packed [32 x 4096 x 1024] 2.7 vs 4.6 ms
// (OpenBLAS packs B on every call; this kernel reads it in place, or from
// panels packed once per update). AVX2 EPYC: see benchmarks/RESULTS.md.
#include "cpu/own_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace tbptt::cpu {
#ifdef TBPTT_OWN_KERNEL
namespace {

// Unaligned vector types (the caller's rows have any alignment).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

// Rows [0, MR) x columns [0, W * NV) of C, W floats per vector V: MR * NV
// accumulators, B read once per k for all MR rows. Each element of C is
// sum_p a[r, p] b[p, j] accumulated in order p = 0..k-1, then + beta * c.
template <typename V, int MR, int NV>
__attribute__((always_inline)) inline void nn_tile(int64_t k, const float* a, int64_t lda,
                                                   const float* b, int64_t ldb, float beta,
                                                   float* c, int64_t ldc) {
  constexpr int W = static_cast<int>(sizeof(V) / sizeof(float));
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t p = 0; p < k; ++p) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + p * ldb + W * v, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const float av = a[r * lda + p];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + W * v;
      if (beta != 0.0f) {
        V cv;
        std::memcpy(&cv, cp, sizeof(V));
        acc[r][v] += beta * cv;
      }
      std::memcpy(cp, &acc[r][v], sizeof(V));
    }
  }
}

// One tile of `rows` (1..8, at most MR) rows.
template <typename V, int MR, int NV>
__attribute__((always_inline)) inline void nn_rows(int64_t rows, int64_t k, const float* a,
                                                   int64_t lda, const float* b, int64_t ldb,
                                                   float beta, float* c, int64_t ldc) {
  switch (rows) {
#define TBPTT_TILE_CASE(R)                                                     \
  case R:                                                                      \
    if constexpr (R <= MR) nn_tile<V, R, NV>(k, a, lda, b, ldb, beta, c, ldc); \
    break;
    TBPTT_TILE_CASE(1)
    TBPTT_TILE_CASE(2)
    TBPTT_TILE_CASE(3)
    TBPTT_TILE_CASE(4)
    TBPTT_TILE_CASE(5)
    TBPTT_TILE_CASE(6)
    TBPTT_TILE_CASE(7)
    TBPTT_TILE_CASE(8)
#undef TBPTT_TILE_CASE
    default:
      break;
  }
}

// All m rows of one panel of NV vectors, in tiles of at most MR rows (a
// remainder of MR + 1 .. 2 MR - 1 rows is cut into two near-equal tiles).
template <typename V, int MR, int NV>
__attribute__((always_inline)) inline void nn_panel(int64_t m, int64_t k, const float* a,
                                                    int64_t lda, const float* b, int64_t ldb,
                                                    float beta, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; m - i >= 2 * MR; i += MR)
    nn_rows<V, MR, NV>(MR, k, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
  const int64_t rest = m - i;
  if (rest > MR) {
    const int64_t first = rest - rest / 2;
    nn_rows<V, MR, NV>(first, k, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
    i += first;
  }
  if (m - i > 0) nn_rows<V, MR, NV>(m - i, k, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
}

// Columns [j0, j1) of C, panel by panel. b: plain B [k, ldb] or panels of
// width PW packed by pack_panels.
template <typename V, int MR, int NV>
__attribute__((always_inline)) inline void nn_columns(int64_t m, int64_t j0, int64_t j1, int64_t k,
                                                      const float* a, int64_t lda, const float* b,
                                                      int64_t ldb, bool packed, float beta,
                                                      float* c, int64_t ldc) {
  constexpr int64_t PW = static_cast<int64_t>(sizeof(V) / sizeof(float)) * NV;
  for (int64_t j = j0; j < j1; j += PW) {
    const int64_t nr = std::min(PW, j1 - j);
    const float* bp = packed ? b + j * k : b + j;
    const int64_t ld = packed ? nr : ldb;
    if (nr == PW) {
      nn_panel<V, MR, NV>(m, k, a, lda, bp, ld, beta, c + j, ldc);
    } else if constexpr (NV == 2 && sizeof(V) == 64) {  // avx512: a last panel of 16
      nn_panel<V, MR, 1>(m, k, a, lda, bp, ld, beta, c + j, ldc);
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) void columns_avx512(int64_t m, int64_t j0, int64_t j1,
                                                              int64_t k, const float* a,
                                                              int64_t lda, const float* b,
                                                              int64_t ldb, bool packed, float beta,
                                                              float* c, int64_t ldc) {
  nn_columns<v16, 8, 2>(m, j0, j1, k, a, lda, b, ldb, packed, beta, c, ldc);
}
__attribute__((target("arch=x86-64-v3"))) void columns_avx2(int64_t m, int64_t j0, int64_t j1,
                                                            int64_t k, const float* a, int64_t lda,
                                                            const float* b, int64_t ldb,
                                                            bool packed, float beta, float* c,
                                                            int64_t ldc) {
  nn_columns<v8, 6, 2>(m, j0, j1, k, a, lda, b, ldb, packed, beta, c, ldc);
}
#endif
void columns_generic(int64_t m, int64_t j0, int64_t j1, int64_t k, const float* a, int64_t lda,
                     const float* b, int64_t ldb, bool packed, float beta, float* c, int64_t ldc) {
  nn_columns<v4, 4, 4>(m, j0, j1, k, a, lda, b, ldb, packed, beta, c, ldc);
}

enum class Isa { kGeneric, kAvx2, kAvx512 };

[[maybe_unused]] bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// The best path the CPU supports, lowered by TBPTT_NO_AVX512 / TBPTT_ISA.
Isa detect() {
  Isa best = Isa::kGeneric;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && !env_on("TBPTT_NO_AVX512") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  const char* want = std::getenv("TBPTT_ISA");
  if (want == nullptr || want[0] == '\0') return best;
  const std::string w(want);
  const Isa asked = w == "avx512"    ? Isa::kAvx512
                    : w == "avx2"    ? Isa::kAvx2
                    : w == "generic" ? Isa::kGeneric
                                     : throw std::invalid_argument(
                                           "TBPTT_ISA must be avx512, avx2 or generic, "
                                           "got '" +
                                           w + "'");
  // A path the CPU cannot run is refused rather than crashing later.
  if (static_cast<int>(asked) > static_cast<int>(best))
    throw std::invalid_argument("TBPTT_ISA=" + w + ": this CPU does not support it");
  return asked;
}

Isa isa() {
  static const Isa value = detect();
  return value;
}

}  // namespace

void own_gemm(int64_t m, int64_t j0, int64_t j1, int64_t k, const float* a, int64_t lda,
              const float* b, int64_t ldb, bool packed, float beta, float* c, int64_t ldc) {
  switch (isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      columns_avx512(m, j0, j1, k, a, lda, b, ldb, packed, beta, c, ldc);
      return;
    case Isa::kAvx2:
      columns_avx2(m, j0, j1, k, a, lda, b, ldb, packed, beta, c, ldc);
      return;
#endif
    default:
      columns_generic(m, j0, j1, k, a, lda, b, ldb, packed, beta, c, ldc);
  }
}

const char* own_kernel_isa() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

int64_t own_panel_width() {
  return isa() == Isa::kAvx512 ? 32 : 16;
}

bool own_kernel_takes(int64_t m, int64_t n, int64_t k) {
  if (m < 1 || m > kOwnMaxM || n % 16 != 0 || k < 1) return false;
  return static_cast<double>(k) * static_cast<double>(n) <= kOwnMaxBElems;
}
#else
const char* own_kernel_isa() {
  return "none";
}
int64_t own_panel_width() {
  return 16;
}
bool own_kernel_takes(int64_t, int64_t, int64_t) {
  return false;
}
#endif

}  // namespace tbptt::cpu
