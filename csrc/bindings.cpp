// Python bindings of tbptt_fast._core: the only file that includes pybind11.
// Converts NumPy <-> the plain views of tbptt/engine_api.h once per call,
// checks what the engines trust (dtype, rank, shape, contiguity, label
// range) and releases the GIL for all native work, after every Python
// object has been read. std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError (pybind11's default translation).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/blas.h"
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
  const auto opt = get_or<std::string>(d, "optimizer", "sgd");
  TBPTT_CHECK_ARG(opt == "sgd" || opt == "adam", "optimizer must be 'sgd' or 'adam', got '", opt,
                  "'");
  c.optimizer = opt == "sgd" ? OptimizerKind::kSgd : OptimizerKind::kAdam;
  c.lr = get_or<double>(d, "lr", c.lr);
  c.momentum = get_or<double>(d, "momentum", c.momentum);
  c.nesterov = get_or<bool>(d, "nesterov", c.nesterov);
  c.beta1 = get_or<double>(d, "beta1", c.beta1);
  c.beta2 = get_or<double>(d, "beta2", c.beta2);
  c.eps = get_or<double>(d, "eps", c.eps);
  c.weight_decay = get_or<double>(d, "weight_decay", c.weight_decay);
  c.clip = d.contains("clip") && !d["clip"].is_none() ? d["clip"].cast<double>() : 0.0;
  c.capacity =
      d.contains("capacity") && !d["capacity"].is_none() ? d["capacity"].cast<int64_t>() : 0;
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

// One engine handle; Kind only separates the Python classes (Engine, CudaEngine).
struct HandleBase {
  std::unique_ptr<tbptt::EngineBase> engine;
  tbptt::Config cfg;
  py::list params;  // the caller's arrays: kept alive because the engine holds their pointers

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
                const py::object& resets_obj, bool flush, bool return_grads, bool return_outputs) {
    const auto dt = model_dtype(cfg);
    py::array x = checked(x_obj, "x", dt, {-1, -1, cfg.input_size});
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
    return execute(in, return_outputs);
  }

  // engine->run(in) without the GIL, with a host [T, B, O] outputs array if asked.
  py::tuple execute(tbptt::RunInputs& in, bool return_outputs) {
    py::object outputs = py::none();
    if (return_outputs) {
      py::array out(model_dtype(cfg),
                    std::vector<py::ssize_t>{in.steps, in.batch, cfg.output_size});
      in.outputs = out.mutable_data();
      outputs = out;
    }
    tbptt::RunResult r;
    {
      py::gil_scoped_release nogil;
      r = engine->run(in);
    }
    return pack(r, in.return_grads, outputs);
  }

  // run() on device arrays (CUDA engine): specs as device_view().
  py::tuple run_device(const py::object& x_spec, const py::object& target_spec,
                       const py::object& mask_spec, const py::object& resets_spec, bool flush,
                       bool return_grads, bool return_outputs) {
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
    return execute(in, return_outputs);
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

  py::tuple flush(bool return_grads) {
    tbptt::RunResult r;
    {
      py::gil_scoped_release nogil;
      r = engine->flush(return_grads);
    }
    return pack(r, return_grads, py::none());
  }

  py::object state() {
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
           py::arg("return_grads") = false, py::arg("return_outputs") = false)
      .def("flush", &H::flush, py::arg("return_grads") = false)
      .def("state", &H::state)
      .def_property_readonly("step_count", [](const H& h) { return h.engine->step_count(); })
      .def_property_readonly("pending", [](const H& h) { return h.engine->pending(); })
      .def_property_readonly("stored_steps", [](const H& h) { return h.engine->stored_steps(); })
      .def("pull_params",
           [](H& h) {
             py::gil_scoped_release nogil;
             h.engine->pull_params();
           })
      .def("push_params", [](H& h) {
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
    d["parallel_min_flops"] = tbptt::cpu::parallel_min_flops();
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
           py::arg("return_outputs") = false)
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
