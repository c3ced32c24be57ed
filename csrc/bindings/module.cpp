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
#include <tuple>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/thread_pool.h"
#include "nf4_tensor.h"

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

using qlora_bindings::Nf4Tensor;

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

qlora::Precision parse_precision(const std::string& name) {
  for (int i = 0; i < qlora::kNumPrecisions; ++i) {
    const auto p = static_cast<qlora::Precision>(i);
    if (name == qlora::precision_name(p)) return p;
  }
  throw std::invalid_argument("precision must be one of 'fp32', 'bf16', 'int8', got '" + name + "'");
}

qlora::ForwardOptions options(const std::string& precision, const std::optional<std::string>& isa) {
  qlora::ForwardOptions o;
  o.precision = parse_precision(precision);
  if (isa) o.table = &qlora::own_kernels_by_name(*isa);
  return o;
}

// Pointers into arrays that are rejected unless float-aligned: a misaligned float32 view (an
// odd byte offset into a buffer) would otherwise reach the kernels as a float*, which is
// undefined behaviour. The Python layer copies such arrays first.
template <class A>
void require_aligned(const A& arr, const char* name) {
  QLORA_REQUIRE(reinterpret_cast<uintptr_t>(arr.data()) % alignof(typename A::value_type) == 0,
                std::string(name) + " must be aligned to its element size");
}

// x: (..., in_features) with any number of leading dimensions (at least one dimension);
// out: the same leading dimensions and out_features last. Both C-contiguous, so the batch is
// the product of the leading dimensions and no reshape is needed on either side.
// Checks x against the tensor and out against x; returns the batch (product of leading dims).
int64_t check_x_out(const Nf4Tensor& t, const F32& x, const F32& out) {
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
  require_writable(out, "out");
  require_aligned(x, "x");
  require_aligned(out, "out");
  return batch;
}

void forward(const Nf4Tensor& t, const F32& x, const F32& a, const F32& b, float scaling,
             const std::optional<F32>& bias, F32& out, const std::string& precision,
             const std::optional<std::string>& isa) {
  const int64_t batch = check_x_out(t, x, out);
  const qlora::ForwardOptions opts = options(precision, isa);
  QLORA_REQUIRE(a.ndim() == 2 && a.shape(1) == t.in_features(),
                "lora_a must have shape (rank, " + std::to_string(t.in_features()) + ")");
  const int64_t rank = a.shape(0);
  QLORA_REQUIRE(b.ndim() == 2 && b.shape(0) == t.out_features() && b.shape(1) == rank,
                "lora_b must have shape (" + std::to_string(t.out_features()) + ", " +
                    std::to_string(rank) + ")");
  if (bias) require_size(*bias, t.out_features(), "bias");
  require_aligned(a, "lora_a");
  require_aligned(b, "lora_b");
  if (bias) require_aligned(*bias, "bias");
  qlora::LoraSegment s;
  s.a = a.data();
  s.b = b.data();
  s.rank = rank;
  s.scaling = scaling;
  const float* pbias = bias ? bias->data() : nullptr;
  const float* px = x.data();
  float* py_ = out.mutable_data();
  py::gil_scoped_release nogil;
  qlora::forward(t.view(), px, batch, &s, rank > 0 ? 1 : 0, pbias, py_, opts);
}

// One adapter of a mixed batch, as the Python layer hands it over: (lora_a, lora_b, scaling,
// rows or None, row_scale or None). rows: int64 strictly ascending batch rows.
using I64 = py::array_t<int64_t, py::array::c_style>;
using Segment = std::tuple<F32, F32, float, std::optional<I64>, std::optional<F32>>;

void forward_adapters(const Nf4Tensor& t, const F32& x, const std::vector<Segment>& segments,
                      const std::optional<F32>& bias, F32& out, const std::string& precision,
                      const std::optional<std::string>& isa) {
  const int64_t batch = check_x_out(t, x, out);
  const qlora::ForwardOptions opts = options(precision, isa);
  if (bias) {
    require_size(*bias, t.out_features(), "bias");
    require_aligned(*bias, "bias");
  }
  std::vector<qlora::LoraSegment> segs;
  segs.reserve(segments.size());
  for (size_t i = 0; i < segments.size(); ++i) {
    const auto& [a, b, scaling, rows, row_scale] = segments[i];
    const std::string which = "adapter segment " + std::to_string(i);
    QLORA_REQUIRE(a.ndim() == 2 && a.shape(1) == t.in_features(),
                  which + ": lora_a must have shape (rank, " + std::to_string(t.in_features()) + ")");
    const int64_t rank = a.shape(0);
    QLORA_REQUIRE(b.ndim() == 2 && b.shape(0) == t.out_features() && b.shape(1) == rank,
                  which + ": lora_b must have shape (" + std::to_string(t.out_features()) + ", " +
                      std::to_string(rank) + ")");
    require_aligned(a, "lora_a");
    require_aligned(b, "lora_b");
    qlora::LoraSegment s;
    s.a = a.data();
    s.b = b.data();
    s.rank = rank;
    s.scaling = scaling;
    int64_t n = batch;
    if (rows) {
      QLORA_REQUIRE(rows->ndim() == 1, which + ": rows must be 1-D");
      require_aligned(*rows, "rows");
      s.rows = rows->data();
      s.n_rows = n = rows->shape(0);
    }
    if (row_scale) {
      require_size(*row_scale, n, (which + ": row_scale").c_str());
      require_aligned(*row_scale, "row_scale");
      s.row_scale = row_scale->data();
    }
    segs.push_back(s);
  }
  const float* pbias = bias ? bias->data() : nullptr;
  const float* px = x.data();
  float* py_ = out.mutable_data();
  py::gil_scoped_release nogil;
  qlora::forward(t.view(), px, batch, segs.data(), static_cast<int64_t>(segs.size()), pbias, py_,
                 opts);
}

// g: (..., out_features), dx: the same leading dimensions and in_features last.
void input_grad(const Nf4Tensor& t, const F32& g, F32& dx) {
  const py::ssize_t nd = g.ndim();
  QLORA_REQUIRE(nd >= 1 && g.shape(nd - 1) == t.out_features(),
                "grad_y must have shape (..., " + std::to_string(t.out_features()) + ")");
  QLORA_REQUIRE(dx.ndim() == nd && dx.shape(nd - 1) == t.in_features(),
                "dx must have shape (..., " + std::to_string(t.in_features()) + ")");
  int64_t batch = 1;
  for (py::ssize_t d = 0; d + 1 < nd; ++d) {
    QLORA_REQUIRE(dx.shape(d) == g.shape(d), "dx must have the leading dimensions of grad_y");
    batch = qlora::checked_mul(batch, g.shape(d), "batch");
  }
  require_writable(dx, "dx");
  require_aligned(g, "grad_y");
  require_aligned(dx, "dx");
  const float* pg = g.data();
  float* pdx = dx.mutable_data();
  py::gil_scoped_release nogil;
  qlora::gemm_nf4t(t.view(), pg, batch, pdx);
}

py::dict choice_dict(int64_t from_batch, const qlora::GemmChoice& c, qlora::Precision asked) {
  py::dict d;
  d["from_batch"] = from_batch;
  d["isa"] = std::string(c.isa);
  d["kernel"] = std::string(c.isa) + ".gemm_nf4_" +
                (c.precision == qlora::Precision::kFp32   ? "f32"
                 : c.precision == qlora::Precision::kBf16 ? "bf16"
                                                          : "q8");
  d["precision"] = std::string(qlora::precision_name(c.precision));
  d["fallback"] = c.precision != asked;
  return d;
}

// What serves each precision on this CPU with the active ISA: a plain dict for qlora.kernel_info().
py::dict kernel_info() {
  py::dict info;
  info["isa"] = std::string(qlora::active_kernels().name);
  info["available_isas"] = qlora::available_isas();
  info["compiled_isas"] = qlora::compiled_isas();
  info["cpu_features"] = qlora::cpu_feature_names();
  py::dict precisions;
  for (int i = 0; i < qlora::kNumPrecisions; ++i) {
    const auto p = static_cast<qlora::Precision>(i);
    py::list regimes;
    for (const auto& [b, c] : qlora::gemm_regimes(p)) regimes.append(choice_dict(b, c, p));
    precisions[qlora::precision_name(p)] = regimes;
  }
  info["precisions"] = precisions;
  // The entries each supported ISA provides itself (the rest it takes from the ISAs below it).
  py::dict own;
  for (const std::string& name : qlora::available_isas()) {
    const qlora::KernelTable& t = qlora::own_kernels_by_name(name);
    py::list entries;
    const std::pair<bool, const char*> have[] = {
        {t.group_absmax != nullptr, "group_absmax"},   {t.quantize_rows != nullptr, "quantize_rows"},
        {t.dequantize_rows != nullptr, "dequantize_rows"}, {t.lora_down != nullptr, "lora_down"},
        {t.lora_up != nullptr, "lora_up"},             {t.pack_bf16 != nullptr, "pack_bf16"},
        {t.quantize_q8 != nullptr, "quantize_q8"},     {t.gemm_nf4_f32.fn != nullptr, "gemm_nf4_f32"},
        {t.gemm_nf4_bf16.fn != nullptr, "gemm_nf4_bf16"}, {t.gemm_nf4_q8.fn != nullptr, "gemm_nf4_q8"},
        {t.gemm_nf4t_f32 != nullptr, "gemm_nf4t_f32"},
    };
    for (const auto& [ok, entry] : have) {
      if (ok) entries.append(entry);
    }
    own[py::str(name)] = entries;
  }
  info["isa_kernels"] = own;
  return info;
}

// The product kernel a forward of this layer at this batch would use (its first batch chunk).
py::dict gemm_choice(const Nf4Tensor& t, const std::string& precision, int64_t batch) {
  const qlora::Precision p = parse_precision(precision);
  QLORA_REQUIRE(batch >= 1, "batch must be >= 1, got " + std::to_string(batch));
  return choice_dict(batch, qlora::choose_gemm(p, std::min(batch, qlora::kBatchChunk), t.view()), p);
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
        py::arg("bias").noconvert(), py::arg("out").noconvert(), py::arg("precision") = "fp32",
        py::arg("isa") = py::none(),
        "Fused x @ deq(W).T + scaling * (x @ A.T) @ B.T + bias into out, in the given precision "
        "(isa: run that instruction set's own product kernel, for tests).");
  m.def("forward_adapters", &forward_adapters, py::arg("tensor"), py::arg("x").noconvert(),
        py::arg("segments"), py::arg("bias").noconvert(), py::arg("out").noconvert(),
        py::arg("precision") = "fp32", py::arg("isa") = py::none(),
        "x @ deq(W).T + bias plus, for each (lora_a, lora_b, scaling, rows, row_scale) segment, "
        "its LoRA term on its rows (all rows when rows is None), into out.");
  m.def("input_grad", &input_grad, py::arg("tensor"), py::arg("grad_y").noconvert(),
        py::arg("dx").noconvert(), "dx = grad_y @ deq(W), decoding the codes on the fly.");
  m.def("kernel_info", &kernel_info, "The kernels serving each precision and batch regime.");
  m.def("gemm_choice", &gemm_choice, py::arg("tensor"), py::arg("precision"), py::arg("batch"),
        "The product kernel a forward of this tensor at this batch uses.");
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
  register_train(m);
}
