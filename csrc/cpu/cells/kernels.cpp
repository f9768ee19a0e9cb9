// The cells' fused pointwise passes as non-template functions, so that the
// float versions can be compiled once per x86-64 ISA level (TBPTT_CLONES in
// vmath.h) and picked at run time: the bodies (cells/*.h) and the activations
// (vmath.h) are always_inline, so each clone is one vectorised loop nest.
// double keeps libm activations (float64 accuracy) and needs no clones.
#include "cpu/cells/gru.h"
#include "cpu/cells/lstm.h"
#include "cpu/cells/rnn.h"

namespace tbptt::cpu {

TBPTT_CLONES void lstm_forward_pass(const LayerParams<float>& p, int64_t batch, int64_t hidden,
                                    const StepCache<float>& s, float* c_state) {
  LstmCell<float>::forward_pointwise(p, batch, hidden, s, c_state);
}
void lstm_forward_pass(const LayerParams<double>& p, int64_t batch, int64_t hidden,
                       const StepCache<double>& s, double* c_state) {
  LstmCell<double>::forward_pointwise(p, batch, hidden, s, c_state);
}
TBPTT_CLONES void lstm_backward_pass(int64_t batch, int64_t hidden, const StepCache<float>& s,
                                     const StepGrad<float>& d, bool has_carry) {
  has_carry ? LstmCell<float>::backward_pointwise<true>(batch, hidden, s, d)
            : LstmCell<float>::backward_pointwise<false>(batch, hidden, s, d);
}
void lstm_backward_pass(int64_t batch, int64_t hidden, const StepCache<double>& s,
                        const StepGrad<double>& d, bool has_carry) {
  has_carry ? LstmCell<double>::backward_pointwise<true>(batch, hidden, s, d)
            : LstmCell<double>::backward_pointwise<false>(batch, hidden, s, d);
}

TBPTT_CLONES void gru_forward_pass(const LayerParams<float>& p, int64_t batch, int64_t hidden,
                                   const StepCache<float>& s, const float* u) {
  GruCell<float>::forward_pointwise(p, batch, hidden, s, u);
}
void gru_forward_pass(const LayerParams<double>& p, int64_t batch, int64_t hidden,
                      const StepCache<double>& s, const double* u) {
  GruCell<double>::forward_pointwise(p, batch, hidden, s, u);
}
TBPTT_CLONES void gru_backward_pass(int64_t batch, int64_t hidden, const StepCache<float>& s,
                                    const StepGrad<float>& d, bool has_carry) {
  has_carry ? GruCell<float>::backward_pointwise<true>(batch, hidden, s, d)
            : GruCell<float>::backward_pointwise<false>(batch, hidden, s, d);
}
void gru_backward_pass(int64_t batch, int64_t hidden, const StepCache<double>& s,
                       const StepGrad<double>& d, bool has_carry) {
  has_carry ? GruCell<double>::backward_pointwise<true>(batch, hidden, s, d)
            : GruCell<double>::backward_pointwise<false>(batch, hidden, s, d);
}

TBPTT_CLONES void rnn_forward_pass(const LayerParams<float>& p, int64_t batch, int64_t hidden,
                                   float* gates, bool relu) {
  rnn_forward_pointwise(p, batch, hidden, gates, relu);
}
void rnn_forward_pass(const LayerParams<double>& p, int64_t batch, int64_t hidden, double* gates,
                      bool relu) {
  rnn_forward_pointwise(p, batch, hidden, gates, relu);
}
TBPTT_CLONES void rnn_backward_pass(int64_t n, const float* y, const StepGrad<float>& d,
                                    bool has_carry, bool relu) {
  has_carry ? rnn_backward_pointwise<true>(n, y, d, relu)
            : rnn_backward_pointwise<false>(n, y, d, relu);
}
void rnn_backward_pass(int64_t n, const double* y, const StepGrad<double>& d, bool has_carry,
                       bool relu) {
  has_carry ? rnn_backward_pointwise<true>(n, y, d, relu)
            : rnn_backward_pointwise<false>(n, y, d, relu);
}

}  // namespace tbptt::cpu
