// Python bindings of tbptt_fast._core: the only file that includes pybind11.
// Converts NumPy <-> the plain views of tbptt/engine_api.h once per call,
// checks what the engines trust (dtype, rank, shape, contiguity, label
// range) and releases the GIL for all native work, after every Python
// object has been read. std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError (pybind11's default translation).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "cpu/own_gemm.h"
#include "tbptt/engine_api.h"
#include "tbptt/errors.h"

namespace py = pybind11;
using tbptt::str_cat;

#ifndef TBPTT_VERSION
#define TBPTT_VERSION "0.0.0"
#endif

namespace {

std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string shape_str(const py::array& a) {
  return shape_str(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

template <typename T>
T get_or(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) ? d[key].cast<T>() : fallback;
}

template <typename T>
T get_required(const py::dict& d, const char* key) {
  TBPTT_CHECK_ARG(d.contains(key), "config is missing the key '", key, "'");
  return d[key].cast<T>();
}

// "sgd", "adam", or "external" (the caller steps: the PyTorch bridge).
tbptt::OptimizerKind optimizer_kind(const std::string& opt) {
  TBPTT_CHECK_ARG(opt == "sgd" || opt == "adam" || opt == "external",
                  "optimizer must be 'sgd', 'adam' or 'external', got '", opt, "'");
  return opt == "sgd"    ? tbptt::OptimizerKind::kSgd
         : opt == "adam" ? tbptt::OptimizerKind::kAdam
                         : tbptt::OptimizerKind::kExternal;
}

// The optimizer keys of a config dict (absent keys: the defaults).
tbptt::Hyperparams hyperparams_from_dict(const py::dict& d) {
  tbptt::Hyperparams hp;
  hp.optimizer = optimizer_kind(get_or<std::string>(d, "optimizer", "sgd"));
  hp.lr = get_or<double>(d, "lr", hp.lr);
  hp.momentum = get_or<double>(d, "momentum", hp.momentum);
  hp.nesterov = get_or<bool>(d, "nesterov", hp.nesterov);
  hp.beta1 = get_or<double>(d, "beta1", hp.beta1);
  hp.beta2 = get_or<double>(d, "beta2", hp.beta2);
  hp.eps = get_or<double>(d, "eps", hp.eps);
  hp.weight_decay = get_or<double>(d, "weight_decay", hp.weight_decay);
  return hp;
}

tbptt::Config config_from_dict(const py::dict& d) {
  using namespace tbptt;
  Config c;
  const auto cell = get_required<std::string>(d, "cell");
  bool known = false;
  std::string names;
#define TBPTT_CELL_FROM_NAME(name, Type)                             \
  names += (names.empty() ? "'" : ", '") + std::string(#name) + "'"; \
  if (cell == #name) {                                               \
    c.cell = CellKind::name;                                         \
    known = true;                                                    \
  }
  TBPTT_CELLS(TBPTT_CELL_FROM_NAME)
#undef TBPTT_CELL_FROM_NAME
  TBPTT_CHECK_ARG(known, "cell must be one of ", names, ", got '", cell, "'");
  c.input_size = get_required<int64_t>(d, "input_size");
  c.hidden_size = get_required<int64_t>(d, "hidden_size");
  c.output_size = get_required<int64_t>(d, "output_size");
  c.num_layers = get_or<int64_t>(d, "num_layers", 1);
  const auto dtype = get_or<std::string>(d, "dtype", "float32");
  TBPTT_CHECK_ARG(dtype == "float32" || dtype == "float64",
                  "dtype must be 'float32' or 'float64', got '", dtype, "'");
  c.dtype = dtype == "float64" ? DType::kFloat64 : DType::kFloat32;
  c.k1 = get_required<int64_t>(d, "k1");
  c.k2 = d.contains("k2") && !d["k2"].is_none() ? d["k2"].cast<int64_t>() : c.k1;
  const auto loss = get_or<std::string>(d, "loss", "mse");
  TBPTT_CHECK_ARG(loss == "mse" || loss == "cross_entropy",
                  "loss must be 'mse' or 'cross_entropy', got '", loss, "'");
  c.loss = loss == "mse" ? LossKind::kMse : LossKind::kCrossEntropy;
  const auto overlap = get_or<std::string>(d, "overlap", "stored");
  TBPTT_CHECK_ARG(overlap == "stored" || overlap == "recompute",
                  "overlap must be 'stored' or 'recompute', got '", overlap, "'");
  c.overlap = overlap == "stored" ? OverlapKind::kStored : OverlapKind::kRecompute;
  c.set_hyperparams(hyperparams_from_dict(d));
  c.clip = d.contains("clip") && !d["clip"].is_none() ? d["clip"].cast<double>() : 0.0;
  c.capacity =
      d.contains("capacity") && !d["capacity"].is_none() ? d["capacity"].cast<int64_t>() : 0;
  c.vocab_size =
      d.contains("vocab_size") && !d["vocab_size"].is_none() ? d["vocab_size"].cast<int64_t>() : 0;
  c.validate();
  return c;
}

py::dtype model_dtype(const tbptt::Config& c) {
  return c.dtype == tbptt::DType::kFloat64 ? py::dtype::of<double>() : py::dtype::of<float>();
}

// Checks dtype and shape (-1 = any) and returns a C-contiguous array (a copy
// only if the input was not contiguous).
py::array checked(const py::handle& obj, const char* name, const py::dtype& dt,
                  const std::vector<int64_t>& shape) {
  TBPTT_CHECK_ARG(py::isinstance<py::array>(obj), name, " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  TBPTT_CHECK_ARG(a.dtype().is(dt), name, " must have dtype ", std::string(py::str(dt)), ", got ",
                  std::string(py::str(a.dtype())));
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i)
    ok = shape[i] < 0 || a.shape(static_cast<py::ssize_t>(i)) == shape[i];
  if (!ok) {
    std::string want = "[";
    for (size_t i = 0; i < shape.size(); ++i)
      want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
    throw std::invalid_argument(str_cat(name, " must have shape ", want, "], got ", shape_str(a)));
  }
  if (!(a.flags() & py::array::c_style)) {
    a = py::module_::import("numpy").attr("ascontiguousarray")(a).cast<py::array>();
  }
  return a;
}

// A device array described by python/tbptt_fast/_device.py:
// (data pointer, ElemType code, shape, strides in bytes, name).
tbptt::DeviceView device_view(const py::handle& spec) {
  const auto t = spec.cast<py::tuple>();
  TBPTT_CHECK_ARG(py::len(t) == 5, "a device array spec is (ptr, code, shape, strides, name)");
  tbptt::DeviceView v;
  v.name = t[4].cast<std::string>();
  v.data = reinterpret_cast<const void*>(t[0].cast<uintptr_t>());
  const int code = t[1].cast<int>();
  TBPTT_CHECK_ARG(code >= 0 && code <= static_cast<int>(tbptt::ElemType::kU64), v.name,
                  ": unknown element type code ", code);
  v.type = static_cast<tbptt::ElemType>(code);
  const auto shape = t[2].cast<std::vector<int64_t>>();
  const auto strides = t[3].cast<std::vector<int64_t>>();
  TBPTT_CHECK_ARG(shape.size() == strides.size() && !shape.empty() && shape.size() <= 3, v.name,
                  ": a device array needs rank 1 to 3 and one stride per axis");
  v.ndim = static_cast<int>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    TBPTT_CHECK_ARG(shape[i] >= 0, v.name, ": negative extent");
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  TBPTT_CHECK_ARG(v.data != nullptr || v.size() == 0, v.name, " has a null data pointer");
  // The kernels read whole elements: a misaligned one would fault (and the
  // CUDA context with it).
  const auto item = static_cast<int64_t>(tbptt::elem_size(v.type));
  bool aligned = reinterpret_cast<uintptr_t>(v.data) % static_cast<uintptr_t>(item) == 0;
  for (int i = 0; i < v.ndim; ++i)
    aligned = aligned && (v.shape[i] <= 1 || v.strides[i] % item == 0);
  TBPTT_CHECK_ARG(aligned, v.name, ": a device array must be aligned to its element size (", item,
                  " bytes), pointer and strides");
  return v;
}

// Rank and extents (-1 = any) of a device array, and its element class.
enum class Want { kFloat, kInteger, kAny };
void check_view(const tbptt::DeviceView& v, const std::vector<int64_t>& shape, Want want) {
  bool ok = v.ndim == static_cast<int>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || v.shape[i] == shape[i];
  TBPTT_CHECK_ARG(ok, v.name, " must have shape ",
                  shape_str(std::vector<int64_t>(shape.begin(), shape.end())), " (-1 = any), got ",
                  shape_str(std::vector<int64_t>(v.shape, v.shape + v.ndim)));
  TBPTT_CHECK_ARG(want != Want::kFloat || tbptt::is_float(v.type), v.name,
                  " must be a floating-point array");
  TBPTT_CHECK_ARG(want != Want::kInteger || tbptt::is_integer(v.type), v.name,
                  " must be an integer array");
}

// Thrown through the engine by a callback whose Python exception is kept
// aside (a `failure` below), to unwind to the binding that raises it.
struct PythonError {};

// reduce = (block, grad), two Python callables (tbptt_fast.distributed), or
// None: tbptt::Reducer calling them with the GIL on NumPy views (no copy) of
// the engine's buffers, in place: block(sums [2] float64), grad(g [n] model
// dtype). A Python exception is kept in `failure` and stops the engine.
tbptt::Reducer python_reducer(const py::object& reduce, const py::dtype& dt,
                              std::unique_ptr<py::error_already_set>& failure) {
  tbptt::Reducer r;
  if (reduce.is_none()) return r;
  const auto pair = reduce.cast<py::tuple>();
  TBPTT_CHECK_ARG(py::len(pair) == 2, "reduce must be a pair (block, grad) of callables");
  const py::object block = pair[0], grad = pair[1];
  const auto call = [&failure](const py::object& fn, const py::dtype& type, void* data, int64_t n) {
    py::gil_scoped_acquire gil;
    try {
      // A capsule as the base: the array views the engine's buffer, no copy.
      const py::capsule none(data, [](void*) {});
      fn(py::array(type, std::vector<py::ssize_t>{static_cast<py::ssize_t>(n)}, data, none));
    } catch (py::error_already_set& e) {
      failure = std::make_unique<py::error_already_set>(std::move(e));
      throw PythonError{};
    }
  };
  r.block = [call, block](double* sums) { call(block, py::dtype::of<double>(), sums, 2); };
  r.grad = [call, grad, dt](void* g, int64_t n) { call(grad, dt, g, n); };
  return r;
}

// One engine handle; Kind only separates the Python classes (Engine, CudaEngine).
struct HandleBase {
  std::unique_ptr<tbptt::EngineBase> engine;
  tbptt::Config cfg;
  py::list params;  // the caller's arrays: kept alive because the engine holds their pointers
  std::atomic<bool> busy{false};
  // True while run()'s on_update callback runs (read and written with the GIL):
  // the engine is then paused between two updates, and the calls that are
  // safe there (between_updates below) may enter.
  bool in_callback = false;

  // Held for the whole of every call that uses the engine: a second thread
  // (or a re-entrant call from a callback) gets a clear error, never a race.
  // between_updates: also allowed from inside the engine's own on_update
  // callback (optimizer values, parameter sync), which then holds nothing.
  struct Busy {
    explicit Busy(HandleBase& h, bool between_updates = false) : h_(h) {
      if (between_updates && h_.in_callback) return;
      TBPTT_CHECK_RT(!h_.busy.exchange(true),
                     "this trainer is busy in another call (another thread, or a callback of "
                     "its own fit): a trainer is not thread-safe, use one per thread");
      held_ = true;
    }
    ~Busy() {
      if (held_) h_.busy.store(false);
    }
    Busy(const Busy&) = delete;
    Busy& operator=(const Busy&) = delete;
    HandleBase& h_;
    bool held_ = false;
  };

  HandleBase(const py::dict& config, const py::list& plist, bool cuda) {
    cfg = config_from_dict(config);
    const auto dt = model_dtype(cfg);
    TBPTT_CHECK_ARG(static_cast<int64_t>(py::len(plist)) == cfg.num_params(), "params must hold ",
                    cfg.num_params(), " arrays (4 * num_layers + 2), got ", py::len(plist));
    std::vector<void*> ptrs;
    for (int64_t i = 0; i < cfg.num_params(); ++i) {
      const auto name = cfg.param_name(i);
      py::handle obj = plist[static_cast<size_t>(i)];
      auto a = checked(obj, name.c_str(), dt, cfg.param_shape(i));
      // checked() copies a non-contiguous array; the engine must see the caller's own
      TBPTT_CHECK_ARG(a.ptr() == obj.ptr() && a.writeable(), name,
                      " must be a C-contiguous, writeable array (it is updated in place)");
      ptrs.push_back(a.mutable_data());
      params.append(a);
    }
    if (cuda) {
#ifdef TBPTT_WITH_CUDA
      py::gil_scoped_release nogil;
      engine = tbptt::make_cuda_engine(cfg, ptrs);
#else
      throw std::runtime_error("tbptt_fast was built without CUDA support");
#endif
    } else {
      engine = tbptt::make_cpu_engine(cfg, ptrs);
    }
  }

  void reset(const py::object& initial_state) {
    const Busy busy_guard(*this);
    if (initial_state.is_none()) {
      engine->reset(nullptr, 0);
      return;
    }
    const auto items = initial_state.cast<py::list>();
    const int64_t need = cfg.num_layers * cfg.state_per_layer();
    TBPTT_CHECK_ARG(static_cast<int64_t>(py::len(items)) == need, "initial_state must hold ", need,
                    " arrays (flat layer-major), got ", py::len(items));
    std::vector<py::array> keep;
    std::vector<const void*> ptrs;
    int64_t batch = -1;
    for (int64_t i = 0; i < need; ++i) {
      auto a = checked(items[static_cast<size_t>(i)], "initial_state entry", model_dtype(cfg),
                       {batch, cfg.hidden_size});
      batch = a.shape(0);
      ptrs.push_back(a.data());
      keep.push_back(a);
    }
    TBPTT_CHECK_ARG(batch >= 1, "initial_state batch must be >= 1");
    py::gil_scoped_release nogil;
    engine->reset(&ptrs, batch);
  }

  py::tuple pack(tbptt::RunResult& r, bool return_grads, py::object outputs) {
    const auto dt = model_dtype(cfg);
    const auto u = static_cast<py::ssize_t>(r.losses.size());
    py::array losses(dt, std::vector<py::ssize_t>{u});
    py::array_t<int64_t> steps(std::vector<py::ssize_t>{u});
    for (py::ssize_t i = 0; i < u; ++i) {
      steps.mutable_at(i) = r.update_steps[static_cast<size_t>(i)];
      if (cfg.dtype == tbptt::DType::kFloat64) {
        static_cast<double*>(losses.mutable_data())[i] = r.losses[static_cast<size_t>(i)];
      } else {
        static_cast<float*>(losses.mutable_data())[i] =
            static_cast<float>(r.losses[static_cast<size_t>(i)]);
      }
    }
    py::object grads = py::none();
    if (return_grads) {
      py::list all;
      for (auto& upd : r.grads) {
        py::list one;
        for (auto& g : upd) {
          std::vector<py::ssize_t> shape(g.shape.begin(), g.shape.end());
          py::array a(dt, shape);
          std::memcpy(a.mutable_data(), g.bytes.data(), g.bytes.size());
          one.append(a);
        }
        all.append(one);
      }
      grads = all;
    }
    return py::make_tuple(losses, steps, grads, outputs);
  }

  py::tuple run(const py::object& x_obj, const py::object& target_obj, const py::object& mask_obj,
                const py::object& resets_obj, bool flush, bool return_grads, bool return_outputs,
                const py::object& on_update, const py::object& reduce) {
    const auto dt = model_dtype(cfg);
    py::array x = checked_x(x_obj);
    const int64_t steps = x.shape(0), batch = x.shape(1);
    TBPTT_CHECK_ARG(steps >= 1 && batch >= 1, "x must have T >= 1 and B >= 1, got ", shape_str(x));
    py::array target, mask, resets;
    if (cfg.loss == tbptt::LossKind::kMse) {
      target = checked(target_obj, "target", dt, {steps, batch, cfg.output_size});
    } else {
      target = checked(target_obj, "target", py::dtype::of<int64_t>(), {steps, batch});
    }
    // A default-constructed py::array is an empty array, not a null handle, so
    // "given" is tracked separately.
    const bool has_mask = !mask_obj.is_none(), has_resets = !resets_obj.is_none();
    if (has_mask) mask = checked(mask_obj, "mask", dt, {steps, batch});
    // Values (labels in range where read, finite inputs) are validated by
    // python/tbptt_fast/_validation.py before this call; the engine trusts them.
    if (has_resets)
      resets = checked(resets_obj, "resets", py::dtype::of<uint8_t>(), {steps, batch});
    tbptt::RunInputs in;
    in.steps = steps;
    in.batch = batch;
    in.x = x.data();
    in.target = target.data();
    in.mask = has_mask ? mask.data() : nullptr;
    in.resets = has_resets ? static_cast<const uint8_t*>(resets.data()) : nullptr;
    in.flush = flush;
    in.return_grads = return_grads;
    return execute(in, return_outputs, on_update, reduce);
  }

  // x: [T, B, D] model dtype, or [T, B] int64 ids with an embedding.
  py::array checked_x(const py::object& x_obj) const {
    if (cfg.vocab_size > 0) return checked(x_obj, "x", py::dtype::of<int64_t>(), {-1, -1});
    return checked(x_obj, "x", model_dtype(cfg), {-1, -1, cfg.input_size});
  }

  // engine->run(in) without the GIL, with a host [T, B, O] outputs array if
  // asked. on_update (a Python callable or None) is called with the GIL after
  // each update as on_update(index, step, loss); a False result stops the run
  // after that update, an exception stops it and is raised here. reduce: see
  // python_reducer (None: one process).
  py::tuple execute(tbptt::RunInputs& in, bool return_outputs, const py::object& on_update,
                    const py::object& reduce) {
    const Busy busy_guard(*this);
    py::object outputs = py::none();
    if (return_outputs) {
      py::array out(model_dtype(cfg),
                    std::vector<py::ssize_t>{in.steps, in.batch, cfg.output_size});
      in.outputs = out.mutable_data();
      outputs = out;
    }
    // A Python exception (from on_update, or a signal such as Ctrl-C seen by
    // poll) is kept here and raised once the engine has returned or stopped
    // at a consistent point.
    std::unique_ptr<py::error_already_set> failure;
    in.reduce = python_reducer(reduce, model_dtype(cfg), failure);
    if (!on_update.is_none()) {
      in.on_update = [&](int64_t index, int64_t step, double loss) {
        py::gil_scoped_acquire gil;
        struct InCallback {
          bool& flag;
          explicit InCallback(bool& f) : flag(f) { flag = true; }
          ~InCallback() { flag = false; }
        } in_cb(in_callback);
        try {
          const py::object r = on_update(index, step, loss);
          return !(r.is(py::bool_(false)));
        } catch (py::error_already_set& e) {
          failure = std::make_unique<py::error_already_set>(std::move(e));
          return false;
        }
      };
    }
    auto last = std::chrono::steady_clock::now();
    in.poll = [&]() {
      const auto now = std::chrono::steady_clock::now();
      if (now - last < std::chrono::milliseconds(50)) return;
      last = now;
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) {
        failure = std::make_unique<py::error_already_set>();
        throw PythonError{};
      }
    };
    tbptt::RunResult r;
    try {
      py::gil_scoped_release nogil;
      r = engine->run(in);
    } catch (const PythonError&) {
    }
    if (failure) throw std::move(*failure);
    return pack(r, in.return_grads, outputs);
  }

  // Forward only: (outputs [T, B, O], final state as a flat list).
  py::tuple forward(const py::object& x_obj, const py::object& resets_obj,
                    const py::object& state_obj, const py::object& reset_state_obj) {
    const Busy busy_guard(*this);
    const auto dt = model_dtype(cfg);
    py::array x = checked_x(x_obj);
    const int64_t steps = x.shape(0), batch = x.shape(1);
    TBPTT_CHECK_ARG(steps >= 1 && batch >= 1, "x must have T >= 1 and B >= 1, got ", shape_str(x));
    tbptt::ForwardInputs in;
    in.steps = steps;
    in.batch = batch;
    in.x = x.data();
    py::array resets;
    if (!resets_obj.is_none()) {
      resets = checked(resets_obj, "resets", py::dtype::of<uint8_t>(), {steps, batch});
      in.resets = static_cast<const uint8_t*>(resets.data());
    }
    const int64_t ns = cfg.num_layers * cfg.state_per_layer();
    std::vector<py::array> keep;
    std::vector<const void*> sptrs, rptrs;
    const auto read_state = [&](const py::object& obj, std::vector<const void*>& ptrs,
                                const char* name) {
      const auto items = obj.cast<py::list>();
      TBPTT_CHECK_ARG(static_cast<int64_t>(py::len(items)) == ns, name, " must hold ", ns,
                      " arrays (flat layer-major), got ", py::len(items));
      for (int64_t i = 0; i < ns; ++i) {
        auto a = checked(items[static_cast<size_t>(i)], name, dt, {batch, cfg.hidden_size});
        ptrs.push_back(a.data());
        keep.push_back(a);
      }
    };
    if (!state_obj.is_none()) {
      read_state(state_obj, sptrs, "state");
      in.state = &sptrs;
    }
    if (!reset_state_obj.is_none()) {
      read_state(reset_state_obj, rptrs, "reset_state");
      in.reset_state = &rptrs;
    }
    py::array out(dt, std::vector<py::ssize_t>{steps, batch, cfg.output_size});
    in.outputs = out.mutable_data();
    py::list state_out;
    for (int64_t i = 0; i < ns; ++i) {
      py::array a(dt, std::vector<py::ssize_t>{batch, cfg.hidden_size});
      in.state_out.push_back(a.mutable_data());
      state_out.append(a);
    }
    {
      py::gil_scoped_release nogil;
      engine->forward(in);
    }
    return py::make_tuple(out, state_out);
  }

  void set_hyperparams(const py::dict& d, bool fresh_state) {
    const Busy busy_guard(*this, true);
    const tbptt::Hyperparams hp = hyperparams_from_dict(d);
    engine->set_hyperparams(hp, fresh_state);
    cfg = engine->config();
  }

  py::array host_to_numpy(const tbptt::HostArray& a) const {
    const py::dtype dt = a.dtype == tbptt::HostArray::kInt64   ? py::dtype::of<int64_t>()
                         : a.dtype == tbptt::HostArray::kUint8 ? py::dtype::of<uint8_t>()
                                                               : model_dtype(cfg);
    py::array out(dt, std::vector<py::ssize_t>(a.shape.begin(), a.shape.end()));
    if (!a.bytes.empty()) std::memcpy(out.mutable_data(), a.bytes.data(), a.bytes.size());
    return out;
  }

  // The engine's complete training state as a dict (see tbptt::EngineSnapshot).
  py::dict snapshot() {
    const Busy busy_guard(*this);
    tbptt::EngineSnapshot s;
    {
      py::gil_scoped_release nogil;
      s = engine->snapshot();
    }
    py::dict d, arrays;
    d["step_count"] = s.step_count;
    d["pending"] = s.pending;
    d["last_update"] = s.last_update;
    d["batch"] = s.batch;
    d["history_steps"] = s.history_steps;
    d["has_state"] = s.has_state;
    d["has_init"] = s.has_init;
    d["pending_loss"] = s.pending_loss;
    d["pending_count"] = s.pending_count;
    d["adam_step"] = s.adam_step;
    for (const auto& [name, a] : s.arrays) arrays[py::str(name)] = host_to_numpy(a);
    d["arrays"] = arrays;
    return d;
  }

  void restore(const py::dict& d) {
    const Busy busy_guard(*this);
    tbptt::EngineSnapshot s;
    const auto need = [&](const char* k) {
      TBPTT_CHECK_ARG(d.contains(k), "checkpoint: missing field '", k, "'");
      return d[k];
    };
    s.step_count = need("step_count").cast<int64_t>();
    s.pending = need("pending").cast<int64_t>();
    s.last_update = need("last_update").cast<int64_t>();
    s.batch = need("batch").cast<int64_t>();
    s.history_steps = need("history_steps").cast<int64_t>();
    s.has_state = need("has_state").cast<bool>();
    s.has_init = need("has_init").cast<bool>();
    s.pending_loss = need("pending_loss").cast<double>();
    s.pending_count = need("pending_count").cast<double>();
    s.adam_step = need("adam_step").cast<int64_t>();
    for (const auto& item : need("arrays").cast<py::dict>()) {
      const auto name = item.first.cast<std::string>();
      auto a = py::reinterpret_borrow<py::array>(item.second);
      TBPTT_CHECK_ARG(py::isinstance<py::array>(item.second), "checkpoint: '", name,
                      "' is not an array");
      tbptt::HostArray h;
      if (a.dtype().is(py::dtype::of<int64_t>())) {
        h.dtype = tbptt::HostArray::kInt64;
      } else if (a.dtype().is(py::dtype::of<uint8_t>())) {
        h.dtype = tbptt::HostArray::kUint8;
      } else {
        TBPTT_CHECK_ARG(a.dtype().is(model_dtype(cfg)), "checkpoint: '", name, "' has dtype ",
                        std::string(py::str(a.dtype())));
      }
      a = py::module_::import("numpy").attr("ascontiguousarray")(a).cast<py::array>();
      h.shape.assign(a.shape(), a.shape() + a.ndim());
      h.bytes.resize(static_cast<size_t>(a.nbytes()));
      if (a.nbytes() > 0) std::memcpy(h.bytes.data(), a.data(), h.bytes.size());
      s.arrays[name] = std::move(h);
    }
    py::gil_scoped_release nogil;
    engine->restore(s);
  }

  // run() on device arrays (CUDA engine): specs as device_view().
  py::tuple run_device(const py::object& x_spec, const py::object& target_spec,
                       const py::object& mask_spec, const py::object& resets_spec, bool flush,
                       bool return_grads, bool return_outputs, const py::object& on_update,
                       const py::object& reduce) {
    TBPTT_CHECK_ARG(cfg.vocab_size == 0,
                    "x: token ids on the cuda backend must be host arrays (CUDA arrays of ids "
                    "are not supported yet)");
    tbptt::DeviceInputs dv;
    dv.x = device_view(x_spec);
    check_view(dv.x, {-1, -1, cfg.input_size}, Want::kFloat);
    const int64_t steps = dv.x.shape[0], batch = dv.x.shape[1];
    TBPTT_CHECK_ARG(steps >= 1 && batch >= 1, "x must have T >= 1 and B >= 1");
    dv.target = device_view(target_spec);
    if (cfg.loss == tbptt::LossKind::kMse) {
      check_view(dv.target, {steps, batch, cfg.output_size}, Want::kFloat);
    } else {
      check_view(dv.target, {steps, batch}, Want::kInteger);
    }
    dv.has_mask = !mask_spec.is_none();
    dv.has_resets = !resets_spec.is_none();
    if (dv.has_mask) {
      dv.mask = device_view(mask_spec);
      check_view(dv.mask, {steps, batch}, Want::kAny);
    }
    if (dv.has_resets) {
      dv.resets = device_view(resets_spec);
      check_view(dv.resets, {steps, batch}, Want::kAny);
    }
    tbptt::RunInputs in;
    in.steps = steps;
    in.batch = batch;
    in.flush = flush;
    in.return_grads = return_grads;
    in.device = &dv;
    return execute(in, return_outputs, on_update, reduce);
  }

  // Value check of one device array (see tbptt::ScanRequest); kind is
  // "finite", "flag" or "class". Returns (first_bad or -1, value as float,
  // value as int). (The per-step mask counts are the engine's own business.)
  py::tuple scan_device(const py::object& spec, const std::string& kind,
                        const py::object& mask_spec, int64_t mask_div, int64_t num_classes) {
    tbptt::ScanRequest req;
    req.array = device_view(spec);
    if (kind == "finite") {
      req.kind = tbptt::ScanKind::kFinite;
    } else if (kind == "flag") {
      req.kind = tbptt::ScanKind::kFlag;
    } else {
      TBPTT_CHECK_ARG(kind == "class", "kind must be 'finite', 'flag' or 'class', got '", kind,
                      "'");
      req.kind = tbptt::ScanKind::kClass;
    }
    tbptt::DeviceView mask;
    if (!mask_spec.is_none()) {
      mask = device_view(mask_spec);
      req.mask = &mask;
    }
    TBPTT_CHECK_ARG(mask_div >= 1, "mask_div must be >= 1");
    req.mask_div = mask_div;
    req.num_classes = num_classes;
    tbptt::ScanResult r;
    {
      py::gil_scoped_release nogil;
      r = engine->scan_device(req);
    }
    return py::make_tuple(r.first_bad, r.value, r.ivalue);
  }

  py::tuple flush(bool return_grads, const py::object& reduce) {
    const Busy busy_guard(*this);
    std::unique_ptr<py::error_already_set> failure;
    const tbptt::Reducer reducer = python_reducer(reduce, model_dtype(cfg), failure);
    tbptt::RunResult r;
    try {
      py::gil_scoped_release nogil;
      r = engine->flush(return_grads, reducer);
    } catch (const PythonError&) {
    }
    if (failure) throw std::move(*failure);
    return pack(r, return_grads, py::none());
  }

  py::object state() {
    const Busy busy_guard(*this);
    const int64_t b = engine->state_batch();
    if (b == 0) return py::none();
    const auto dt = model_dtype(cfg);
    py::list out;
    std::vector<void*> ptrs;
    for (int64_t i = 0; i < cfg.num_layers * cfg.state_per_layer(); ++i) {
      py::array a(dt, std::vector<py::ssize_t>{b, cfg.hidden_size});
      ptrs.push_back(a.mutable_data());
      out.append(a);
    }
    engine->state(ptrs);
    return out;
  }
};

template <int Kind>
struct Handle : HandleBase {
  Handle(const py::dict& config, const py::list& params) : HandleBase(config, params, Kind == 1) {}
};

template <typename H>
py::class_<H> bind_engine(py::module_& m, const char* name, const char* doc) {
  return py::class_<H>(m, name, doc)
      .def(py::init<const py::dict&, const py::list&>(), py::arg("config"), py::arg("params"))
      .def("reset", &H::reset, py::arg("initial_state") = py::none())
      .def("run", &H::run, py::arg("x"), py::arg("target"), py::arg("mask") = py::none(),
           py::arg("resets") = py::none(), py::arg("flush") = false,
           py::arg("return_grads") = false, py::arg("return_outputs") = false,
           py::arg("on_update") = py::none(), py::arg("reduce") = py::none())
      .def("forward", &H::forward, py::arg("x"), py::arg("resets") = py::none(),
           py::arg("state") = py::none(), py::arg("reset_state") = py::none(),
           "Forward only: (outputs [T, B, O], final state); the training state is untouched.")
      .def("set_hyperparams", &H::set_hyperparams, py::arg("config"),
           py::arg("fresh_state") = false,
           "New optimizer hyperparameters from the next update on (state kept unless fresh).")
      .def(
          "grads",
          [](py::object self) {
            H& h = self.cast<H&>();
            auto* g = static_cast<unsigned char*>(h.engine->grad_data());
            TBPTT_CHECK_ARG(g != nullptr, "grads() views host memory: cpu engines only");
            const auto off = h.cfg.param_offsets();
            const size_t item = h.cfg.dtype_size();
            py::list out;
            for (int64_t i = 0; i < h.cfg.num_params(); ++i) {
              const auto shape = h.cfg.param_shape(i);
              out.append(py::array(
                  model_dtype(h.cfg), std::vector<py::ssize_t>(shape.begin(), shape.end()),
                  g + static_cast<size_t>(off[static_cast<size_t>(i)]) * item, self));
            }
            return out;
          },
          "Views (no copy) of the last update's gradient per parameter, canonical order; valid "
          "inside on_update until the next update (cpu engines).")
      .def("snapshot", &H::snapshot, "The complete training state (checkpoints).")
      .def("restore", &H::restore, py::arg("snapshot"), "Restore a snapshot() (checkpoints).")
      .def("flush", &H::flush, py::arg("return_grads") = false, py::arg("reduce") = py::none())
      .def("state", &H::state)
      // The counters are written by a run with the GIL released: read them only
      // when no call is running (or from its own on_update, between updates).
      .def_property_readonly("step_count",
                             [](H& h) {
                               const typename H::Busy busy_guard(h, true);
                               return h.engine->step_count();
                             })
      .def_property_readonly("pending",
                             [](H& h) {
                               const typename H::Busy busy_guard(h, true);
                               return h.engine->pending();
                             })
      .def_property_readonly("stored_steps",
                             [](H& h) {
                               const typename H::Busy busy_guard(h, true);
                               return h.engine->stored_steps();
                             })
      .def("pull_params",
           [](H& h) {
             const typename H::Busy busy_guard(h, true);
             py::gil_scoped_release nogil;
             h.engine->pull_params();
           })
      .def("push_params", [](H& h) {
        const typename H::Busy busy_guard(h, true);
        py::gil_scoped_release nogil;
        h.engine->push_params();
      });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "tbptt_fast native engines (C++ CPU, optional CUDA)";
  m.attr("__version__") = TBPTT_VERSION;
  m.def(
      "set_num_threads", [](int n) { tbptt::cpu::set_num_threads(n); }, py::arg("n"),
      "Set the OpenBLAS thread count used for block/window products.");
  m.def("get_num_threads", []() { return tbptt::cpu::get_num_threads(); });
  m.def(
      "cells",
      []() {
        py::list out;
#define TBPTT_CELL_ENTRY(name, Type) out.append(py::make_tuple(#name, Type::kGates, Type::kStates));
        TBPTT_CELLS(TBPTT_CELL_ENTRY)
#undef TBPTT_CELL_ENTRY
        return out;
      },
      "The cell registry: (name, gates, states per layer) per cell, in registry order.");
  // tbptt::NonFiniteError -> tbptt_fast.errors.NonFiniteError (a RuntimeError).
  // Leaked on purpose: it must outlive the interpreter's teardown of this module.
  static auto* non_finite =
      new py::object(py::module_::import("tbptt_fast.errors").attr("NonFiniteError"));
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const tbptt::NonFiniteError& e) {
      PyErr_SetString(non_finite->ptr(), e.what());
    } catch (const tbptt::MemoryLimitError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });
  m.def("cuda_available", []() {
#ifdef TBPTT_WITH_CUDA
    return tbptt::cuda_device_available();
#else
    return false;
#endif
  });
  m.def("build_info", []() {
    py::dict d;
    d["version"] = TBPTT_VERSION;
#ifdef TBPTT_WITH_CUDA
    d["cuda"] = true;
    d["cuda_info"] = tbptt::cuda_build_info();
#else
    d["cuda"] = false;
    d["cuda_info"] = "";
#endif
#ifdef TBPTT_SANITIZE
    d["sanitizers"] = true;
#else
    d["sanitizers"] = false;
#endif
    d["blas"] = tbptt::cpu::blas_name();
    d["blas_threads"] = tbptt::cpu::get_num_threads();
    d["own_kernel"] = tbptt::cpu::own_kernel_isa();
#ifdef __VERSION__
    d["compiler"] = __VERSION__;
#endif
    return d;
  });
  bind_engine<Handle<0>>(m, "Engine", "C++ CPU TBPTT(k1, k2) engine (tbptt/engine_api.h).");
#ifdef TBPTT_WITH_CUDA
  bind_engine<Handle<1>>(m, "CudaEngine", "CUDA TBPTT(k1, k2) engine (tbptt/engine_api.h).")
      .def("run_device", &Handle<1>::run_device, py::arg("x"), py::arg("target"), py::arg("mask"),
           py::arg("resets"), py::arg("flush") = false, py::arg("return_grads") = false,
           py::arg("return_outputs") = false, py::arg("on_update") = py::none(),
           py::arg("reduce") = py::none())
      .def(
          "graph_stats",
          [](const Handle<1>& h) {
            std::string why;
            const auto v = h.engine->graph_stats(&why);
            py::dict d;
            d["recorded"] = v[0];
            d["replayed"] = v[1];
            d["direct"] = v[2];
            d["failed"] = v[3];
            d["first_failure"] = why;
            return d;
          },
          "CUDA graph use (TBPTT_CUDA_GRAPHS): counts and the first capture failure.")
      .def("scan_device", &Handle<1>::scan_device, py::arg("array"), py::arg("kind"),
           py::arg("mask") = py::none(), py::arg("mask_div") = 1, py::arg("num_classes") = 0);
#endif
}
