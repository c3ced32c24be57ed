// The pybind11 module qlora._core: thin glue only. Arrays arrive as exact float32/uint8
// C-contiguous buffers (.noconvert(), so nothing is ever copied silently here; the Python
// package converts and validates first), raw pointers are taken with the GIL held, and the GIL
// is released only around pure compute. std::invalid_argument from the core becomes ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/thread_pool.h"

// Formats the message only on failure: these checks run on every forward, and building their
// strings eagerly (std::to_string and concatenations, dozens of allocations) was a large part
// of the fixed cost of a small forward call.
#define QLORA_REQUIRE(ok, msg)                   \
  do {                                           \
    if (!(ok)) throw std::invalid_argument(msg); \
  } while (0)

namespace py = pybind11;

namespace {

using F32 = py::array_t<float, py::array::c_style>;
using U8 = py::array_t<uint8_t, py::array::c_style>;

void require_size(const py::array& a, int64_t expected, const char* name) {
  QLORA_REQUIRE(static_cast<int64_t>(a.size()) == expected,
                std::string(name) + " must have " + std::to_string(expected) + " elements, got " +
                    std::to_string(a.size()));
}

void require_writable(const py::array& a, const char* name) {
  QLORA_REQUIRE(a.writeable(), std::string(name) + " must be writable");
}

// An immutable quantized weight: the arrays it was built from stay referenced here, so a
// forward running without the GIL can never see them freed.
class Nf4Tensor {
 public:
  Nf4Tensor(U8 codes, std::optional<F32> scales, std::optional<U8> qscales,
            std::optional<F32> nested_scales, std::optional<F32> nested_map, float nested_offset,
            int64_t out_features, int64_t in_features, int64_t group_size)
      : codes_(std::move(codes)) {
    w_.out_features = out_features;
    w_.in_features = in_features;
    w_.group_size = group_size;
    const int64_t n = qlora::checked_mul(out_features, in_features, "out_features * in_features");
    w_.num_groups = qlora::group_count(n, group_size);
    require_size(codes_, qlora::packed_bytes(out_features, in_features), "codes");
    w_.codes = codes_.data();
    if (scales) {
      QLORA_REQUIRE(!qscales && !nested_scales && !nested_map,
                    "give either scales or the double-quantized scales, not both");
      scales_ = *scales;
      require_size(scales_, w_.num_groups, "scales");
      w_.scales = scales_.data();
    } else {
      QLORA_REQUIRE(qscales && nested_scales && nested_map,
                    "double-quantized scales need qscales, nested_scales and nested_map");
      qscales_ = *qscales;
      nested_scales_ = *nested_scales;
      nested_map_ = *nested_map;
      require_size(qscales_, w_.num_groups, "qscales");
      require_size(nested_scales_, (w_.num_groups - 1) / qlora::kNestedBlock + 1, "nested_scales");
      require_size(nested_map_, 256, "nested_map");
      w_.qscales = qscales_.data();
      w_.nested_scales = nested_scales_.data();
      w_.nested_map = nested_map_.data();
      w_.nested_offset = nested_offset;
    }
    qlora::validate_weight(w_);
  }
  const qlora::Nf4Weight& view() const { return w_; }
  int64_t out_features() const { return w_.out_features; }
  int64_t in_features() const { return w_.in_features; }
  int64_t group_size() const { return w_.group_size; }
  int64_t num_groups() const { return w_.num_groups; }

 private:
  U8 codes_;
  F32 scales_;
  U8 qscales_;
  F32 nested_scales_, nested_map_;
  qlora::Nf4Weight w_;
};

void quantize(const F32& w, int64_t group_size, U8& codes, F32& absmax) {
  QLORA_REQUIRE(w.ndim() == 2, "weight must be 2-D, got " + std::to_string(w.ndim()) + "-D");
  const int64_t out = w.shape(0), in = w.shape(1);
  const int64_t n = qlora::checked_mul(out, in, "out_features * in_features");
  require_size(codes, qlora::packed_bytes(out, in), "codes");
  require_size(absmax, qlora::group_count(n, group_size), "absmax");
  require_writable(codes, "codes");
  require_writable(absmax, "absmax");
  const float* pw = w.data();
  uint8_t* pc = codes.mutable_data();
  float* pa = absmax.mutable_data();
  py::gil_scoped_release nogil;
  qlora::quantize_nf4(pw, out, in, group_size, pc, pa);
}

void dequantize(const Nf4Tensor& t, F32& out) {
  require_size(out, qlora::checked_mul(t.out_features(), t.in_features(), "weight size"), "out");
  require_writable(out, "out");
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  qlora::dequantize_nf4(t.view(), po);
}

// x: (..., in_features) with any number of leading dimensions (at least one dimension);
// out: the same leading dimensions and out_features last. Both C-contiguous, so the batch is
// the product of the leading dimensions and no reshape is needed on either side.
void forward(const Nf4Tensor& t, const F32& x, const F32& a, const F32& b, float scaling,
             const std::optional<F32>& bias, F32& out) {
  const py::ssize_t nd = x.ndim();
  QLORA_REQUIRE(nd >= 1 && x.shape(nd - 1) == t.in_features(),
                "x must have shape (..., " + std::to_string(t.in_features()) + ")");
  int64_t batch = 1;
  bool same_lead = out.ndim() == nd && out.shape(nd - 1) == t.out_features();
  for (py::ssize_t d = 0; d + 1 < nd; ++d) {
    batch = qlora::checked_mul(batch, x.shape(d), "batch");
    same_lead = same_lead && out.shape(d) == x.shape(d);
  }
  if (!same_lead) {
    auto shape_str = [](const py::array& arr, py::ssize_t n, int64_t last) {
      std::string sh = "(";
      for (py::ssize_t d = 0; d + 1 < n; ++d) sh += std::to_string(arr.shape(d)) + ", ";
      return sh + std::to_string(last) + (n == 1 ? ",)" : ")");
    };
    throw std::invalid_argument("out must have shape " + shape_str(x, nd, t.out_features()) +
                                " to match x, got " +
                                shape_str(out, out.ndim(), out.ndim() ? out.shape(out.ndim() - 1) : 0));
  }
  QLORA_REQUIRE(a.ndim() == 2 && a.shape(1) == t.in_features(),
                "lora_a must have shape (rank, " + std::to_string(t.in_features()) + ")");
  const int64_t rank = a.shape(0);
  QLORA_REQUIRE(b.ndim() == 2 && b.shape(0) == t.out_features() && b.shape(1) == rank,
                "lora_b must have shape (" + std::to_string(t.out_features()) + ", " +
                    std::to_string(rank) + ")");
  if (bias) require_size(*bias, t.out_features(), "bias");
  require_writable(out, "out");
  const float* px = x.data();
  const float* pa = a.data();
  const float* pb = b.data();
  const float* pbias = bias ? bias->data() : nullptr;
  float* py_ = out.mutable_data();
  py::gil_scoped_release nogil;
  qlora::forward(t.view(), px, batch, pa, pb, rank, scaling, pbias, py_);
}

void from_bnb(const U8& flat, int64_t out_features, int64_t in_features, U8& codes) {
  const int64_t n = qlora::checked_mul(out_features, in_features, "out_features * in_features");
  require_size(flat, (n + 1) / 2, "packed bitsandbytes codes");
  require_size(codes, qlora::packed_bytes(out_features, in_features), "codes");
  require_writable(codes, "codes");
  const uint8_t* pf = flat.data();
  uint8_t* pc = codes.mutable_data();
  py::gil_scoped_release nogil;
  qlora::codes_from_bnb(pf, out_features, in_features, pc);
}

void to_bnb(const U8& codes, int64_t out_features, int64_t in_features, U8& flat) {
  const int64_t n = qlora::checked_mul(out_features, in_features, "out_features * in_features");
  require_size(codes, qlora::packed_bytes(out_features, in_features), "codes");
  require_size(flat, (n + 1) / 2, "packed bitsandbytes codes");
  require_writable(flat, "flat");
  const uint8_t* pc = codes.data();
  uint8_t* pf = flat.mutable_data();
  py::gil_scoped_release nogil;
  qlora::codes_to_bnb(pc, out_features, in_features, pf);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "qlora C++ core: NF4 quantization and the fused QLoRA forward (private module).";
#ifdef QLORA_VERSION
  m.attr("__version__") = QLORA_VERSION;
#endif
  m.attr("BLOCK_COLS") = qlora::kBlockCols;
  m.attr("NESTED_BLOCK") = qlora::kNestedBlock;
  m.attr("BATCH_CHUNK") = qlora::kBatchChunk;
  py::list cb;
  for (float v : qlora::kNf4Codebook) cb.append(v);
  m.attr("NF4_CODEBOOK") = py::tuple(cb);

  py::class_<Nf4Tensor>(m, "Nf4Tensor")
      .def(py::init<U8, std::optional<F32>, std::optional<U8>, std::optional<F32>,
                    std::optional<F32>, float, int64_t, int64_t, int64_t>(),
           py::arg("codes").noconvert(), py::arg("scales").noconvert(),
           py::arg("qscales").noconvert(), py::arg("nested_scales").noconvert(),
           py::arg("nested_map").noconvert(), py::arg("nested_offset"), py::arg("out_features"),
           py::arg("in_features"), py::arg("group_size"))
      .def_property_readonly("out_features", &Nf4Tensor::out_features)
      .def_property_readonly("in_features", &Nf4Tensor::in_features)
      .def_property_readonly("group_size", &Nf4Tensor::group_size)
      .def_property_readonly("num_groups", &Nf4Tensor::num_groups);

  m.def("quantize_nf4", &quantize, py::arg("weight").noconvert(), py::arg("group_size"),
        py::arg("codes").noconvert(), py::arg("absmax").noconvert(),
        "Quantize a float32 (out, in) weight into packed codes and per-group absmax.");
  m.def("dequantize_nf4", &dequantize, py::arg("tensor"), py::arg("out").noconvert(),
        "Write the dequantized float32 weight into out.");
  m.def("forward", &forward, py::arg("tensor"), py::arg("x").noconvert(),
        py::arg("lora_a").noconvert(), py::arg("lora_b").noconvert(), py::arg("scaling"),
        py::arg("bias").noconvert(), py::arg("out").noconvert(),
        "Fused x @ deq(W).T + scaling * (x @ A.T) @ B.T + bias into out.");
  m.def("codes_from_bnb", &from_bnb, py::arg("flat").noconvert(), py::arg("out_features"),
        py::arg("in_features"), py::arg("codes").noconvert(),
        "Convert bitsandbytes flat packing into qlora's packed rows.");
  m.def("codes_to_bnb", &to_bnb, py::arg("codes").noconvert(), py::arg("out_features"),
        py::arg("in_features"), py::arg("flat").noconvert(),
        "Convert qlora's packed rows into bitsandbytes flat packing.");
  m.def("packed_bytes", &qlora::packed_bytes, py::arg("out_features"), py::arg("in_features"));
  m.def("group_count", &qlora::group_count, py::arg("n"), py::arg("group_size"));

  m.def("active_isa", [] { return std::string(qlora::active_kernels().name); });
  m.def("available_isas", &qlora::available_isas);
  m.def("compiled_isas", &qlora::compiled_isas);
  m.def("set_isa", &qlora::set_active_isa, py::arg("name"));
  m.def("get_num_threads", &qlora::get_num_threads);
  m.def("set_num_threads", &qlora::set_num_threads, py::arg("n"));
  m.def("default_num_threads", &qlora::default_num_threads);
  // The GIL is released while pool_info waits for a running job and starts the workers.
  m.def("thread_pool_info", [] {
    qlora::PoolInfo info;
    {
      py::gil_scoped_release release;
      info = qlora::pool_info();
    }
    py::dict d;
    d["requested"] = info.requested;
    d["threads"] = info.threads;
    d["serial_fallback_reason"] = info.serial_fallback_reason.empty()
                                      ? py::object(py::none())
                                      : py::object(py::str(info.serial_fallback_reason));
    return d;
  }, "The core's thread pool: requested and running threads, and why it runs serially (or None).");
}
