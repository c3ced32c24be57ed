// pybind11 glue of the training core (qlora/train.h): glue only, as module.cpp. Arrays arrive as
// exact float32 C-contiguous buffers (.noconvert()), shapes are checked here against the tensor,
// raw pointers are taken with the GIL held and the GIL is released around compute.
// std::invalid_argument becomes ValueError. The functions, for the Python layer to build on:
//
//   forward_train(tensor, x, lora_a, lora_b, scaling, bias, out, u, dropout=0.0, seed=0,
//                 precision="fp32") -> None
//       x (..., in) -> out (..., out_features) = base + bias + scaling * u @ lora_b.T, and
//       u (..., rank) = dropout(x) @ lora_a.T (saved for backward). bias: (out,) or None.
//   backward(tensor, x, lora_a, lora_b, scaling, u, grad_y, dx=None, da=None, db=None,
//            dbias=None, dropout=0.0, seed=0) -> None
//       grad_y (..., out_features) with x's leading dimensions. Each output given is written:
//       dx (..., in), da (rank, in), db (out_features, rank), dbias (out_features,). x may be
//       None unless da is given, u None unless db is. dropout and seed must be the forward's.
//   dropout_mask(batch, in_features, dropout, seed, out) -> None
//       out: uint8 (batch, in_features), 1 where the training forward keeps x.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "nf4_tensor.h"
#include "qlora/ops.h"
#include "qlora/train.h"

namespace py = pybind11;

namespace {

using qlora_bindings::F32;
using qlora_bindings::Nf4Tensor;
using U8 = py::array_t<uint8_t, py::array::c_style>;

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

template <class A>
void require_aligned(const A& arr, const char* name) {
  require(reinterpret_cast<uintptr_t>(arr.data()) % alignof(typename A::value_type) == 0,
          std::string(name) + " must be aligned to its element size");
}

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// The batch of `a` (product of its leading dimensions) after checking its last dimension is
// `last` and its leading dimensions are `lead`'s (when given).
int64_t rows_of(const py::array& a, int64_t last, const char* name, const py::array* lead = nullptr) {
  const py::ssize_t nd = a.ndim();
  require(nd >= 1 && a.shape(nd - 1) == last,
          std::string(name) + " must have shape (..., " + std::to_string(last) + "), got " + shape_of(a));
  int64_t batch = 1;
  for (py::ssize_t d = 0; d + 1 < nd; ++d) batch = qlora::checked_mul(batch, a.shape(d), "batch");
  if (lead != nullptr) {
    bool same = lead->ndim() == nd;
    for (py::ssize_t d = 0; same && d + 1 < nd; ++d) same = lead->shape(d) == a.shape(d);
    require(same, std::string(name) + " must have the leading dimensions of " + shape_of(*lead) + ", got " +
                      shape_of(a));
  }
  return batch;
}

void require_shape2(const py::array& a, int64_t d0, int64_t d1, const char* name) {
  require(a.ndim() == 2 && a.shape(0) == d0 && a.shape(1) == d1,
          std::string(name) + " must have shape (" + std::to_string(d0) + ", " + std::to_string(d1) + "), got " +
              shape_of(a));
}

void require_out(const F32& a, const char* name) {
  require(a.writeable(), std::string(name) + " must be writable");
  require_aligned(a, name);
}

qlora::LoraAdapter adapter(const Nf4Tensor& t, const F32& a, const F32& b, float scaling) {
  require(a.ndim() == 2 && a.shape(1) == t.in_features(),
          "lora_a must have shape (rank, " + std::to_string(t.in_features()) + "), got " + shape_of(a));
  require_shape2(b, t.out_features(), a.shape(0), "lora_b");
  require_aligned(a, "lora_a");
  require_aligned(b, "lora_b");
  return {a.data(), b.data(), a.shape(0), scaling};
}

qlora::Precision parse_precision(const std::string& name) {
  for (int i = 0; i < qlora::kNumPrecisions; ++i) {
    const auto p = static_cast<qlora::Precision>(i);
    if (name == qlora::precision_name(p)) return p;
  }
  throw std::invalid_argument("precision must be one of 'fp32', 'bf16', 'int8', got '" + name + "'");
}

void forward_train(const Nf4Tensor& t, const F32& x, const F32& a, const F32& b, float scaling,
                   const std::optional<F32>& bias, F32& out, F32& u, float dropout, uint64_t seed,
                   const std::string& precision) {
  const int64_t batch = rows_of(x, t.in_features(), "x");
  rows_of(out, t.out_features(), "out", &x);
  const qlora::LoraAdapter lora = adapter(t, a, b, scaling);
  rows_of(u, lora.rank, "u", &x);
  require_aligned(x, "x");
  require_out(out, "out");
  require_out(u, "u");
  if (bias) {
    qlora_bindings::require_size(*bias, t.out_features(), "bias");
    require_aligned(*bias, "bias");
  }
  qlora::ForwardOptions opts;
  opts.precision = parse_precision(precision);
  const float* px = x.data();
  const float* pbias = bias ? bias->data() : nullptr;
  float* py_ = out.mutable_data();
  float* pu = u.mutable_data();
  py::gil_scoped_release nogil;
  qlora::forward_train(t.view(), px, batch, lora, pbias, {dropout, seed}, py_, pu, opts);
}

void backward(const Nf4Tensor& t, const std::optional<F32>& x, const F32& a, const F32& b, float scaling,
              const std::optional<F32>& u, const F32& g, std::optional<F32> dx, std::optional<F32> da,
              std::optional<F32> db, std::optional<F32> dbias, float dropout, uint64_t seed) {
  const int64_t batch = rows_of(g, t.out_features(), "grad_y");
  require_aligned(g, "grad_y");
  const qlora::LoraAdapter lora = adapter(t, a, b, scaling);
  require(!da || x, "x is needed for the lora_a gradient");
  require(!db || u, "u is needed for the lora_b gradient");
  if (x) {
    rows_of(*x, t.in_features(), "x", &g);
    require_aligned(*x, "x");
  }
  if (u) {
    rows_of(*u, lora.rank, "u", &g);
    require_aligned(*u, "u");
  }
  qlora::LoraGrads grads;
  if (dx) {
    rows_of(*dx, t.in_features(), "dx", &g);
    require_out(*dx, "dx");
    grads.dx = dx->mutable_data();
  }
  if (da) {
    require_shape2(*da, lora.rank, t.in_features(), "da");
    require_out(*da, "da");
    grads.da = da->mutable_data();
  }
  if (db) {
    require_shape2(*db, t.out_features(), lora.rank, "db");
    require_out(*db, "db");
    grads.db = db->mutable_data();
  }
  if (dbias) {
    require(dbias->ndim() == 1 && dbias->shape(0) == t.out_features(),
            "dbias must have shape (" + std::to_string(t.out_features()) + ",), got " + shape_of(*dbias));
    require_out(*dbias, "dbias");
    grads.dbias = dbias->mutable_data();
  }
  const float* px = x ? x->data() : nullptr;
  const float* pu = u ? u->data() : nullptr;
  const float* pg = g.data();
  py::gil_scoped_release nogil;
  qlora::backward(t.view(), px, batch, lora, {dropout, seed}, pu, pg, grads);
}

void dropout_mask(int64_t batch, int64_t in_features, float dropout, uint64_t seed, U8& out) {
  require(batch >= 0 && in_features >= 1, "batch must be >= 0 and in_features >= 1");
  require(out.ndim() == 2 && out.shape(0) == batch && out.shape(1) == in_features,
          "out must have shape (" + std::to_string(batch) + ", " + std::to_string(in_features) + "), got " +
              shape_of(out));
  require(out.writeable(), "out must be writable");
  uint8_t* po = out.mutable_data();
  py::gil_scoped_release nogil;
  qlora::dropout_mask({dropout, seed}, batch, in_features, po);
}

}  // namespace

void register_train(py::module_& m) {
  m.def("forward_train", &forward_train, py::arg("tensor"), py::arg("x").noconvert(), py::arg("lora_a").noconvert(),
        py::arg("lora_b").noconvert(), py::arg("scaling"), py::arg("bias").noconvert(), py::arg("out").noconvert(),
        py::arg("u").noconvert(), py::arg("dropout") = 0.0f, py::arg("seed") = 0, py::arg("precision") = "fp32",
        "Training forward: out = x @ deq(W).T + bias + scaling * u @ lora_b.T with u = dropout(x) @ lora_a.T "
        "written for backward.");
  m.def("backward", &backward, py::arg("tensor"), py::arg("x").noconvert(), py::arg("lora_a").noconvert(),
        py::arg("lora_b").noconvert(), py::arg("scaling"), py::arg("u").noconvert(), py::arg("grad_y").noconvert(),
        py::arg("dx").noconvert() = py::none(), py::arg("da").noconvert() = py::none(),
        py::arg("db").noconvert() = py::none(), py::arg("dbias").noconvert() = py::none(),
        py::arg("dropout") = 0.0f, py::arg("seed") = 0,
        "LoRA backward: writes each gradient given (dx, da, db, dbias) for upstream grad_y.");
  m.def("dropout_mask", &dropout_mask, py::arg("batch"), py::arg("in_features"), py::arg("dropout"),
        py::arg("seed"), py::arg("out").noconvert(), "The training forward's dropout keep mask (uint8).");
}
