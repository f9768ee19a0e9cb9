// The cell registry: ONE line per cell. TBPTT_CELLS(X) expands X(name, Type)
// for every cell, in the order of the CellKind enum and of the exported list
// (_core.cells(), which python/tbptt_fast/reference.py's table must match).
// Everything that enumerates cells (the enum, names, gate/state counts, the
// engine factories, the CPU pointwise clones) is generated from this list.
#pragma once

#include "cells/cifg.h"
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"

#define TBPTT_CELLS(X)                     \
  X(rnn_tanh, ::tbptt::cells::RnnTanhCell) \
  X(rnn_relu, ::tbptt::cells::RnnReluCell) \
  X(lstm, ::tbptt::cells::LstmCell)        \
  X(gru, ::tbptt::cells::GruCell)          \
  X(cifg, ::tbptt::cells::CifgCell)
