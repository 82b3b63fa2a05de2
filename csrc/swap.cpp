// The op's schema, its argument checks and the Python module stub.
// Kernels: cpu/swap_kernel.cpp, cuda/swap_kernel.cu (each registers itself).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "swap.h"

namespace ipsd {

namespace {

// Without the a + b - 1 of the usual form, which overflows for huge b.
int64_t ceil_div(int64_t a, int64_t b) {
  return a / b + (a % b != 0);
}

} // namespace

int64_t plan_layout(
    const at::Tensor& x,
    const at::Tensor& partner,
    const at::Tensor& mask,
    int64_t patch_h,
    int64_t patch_w,
    int64_t max_unit_bytes,
    SwapLayout* layout) {
  TORCH_CHECK_VALUE(
      x.dim() == 3 || x.dim() == 4,
      "apply_plan_: x must be (N, H, W) or (N, C, H, W), got shape ",
      x.sizes());
  TORCH_CHECK_VALUE(
      x.is_contiguous() ||
          (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
      "apply_plan_: x must be contiguous or channels_last to be swapped in "
      "place, got strides ",
      x.strides());
  TORCH_CHECK_VALUE(
      patch_h >= 1 && patch_w >= 1,
      "apply_plan_: patch size must be >= 1, got (",
      patch_h,
      ", ",
      patch_w,
      ")");
  TORCH_CHECK_TYPE(
      partner.scalar_type() == at::kLong,
      "apply_plan_: partner must be int64, got ",
      partner.scalar_type());
  TORCH_CHECK_TYPE(
      mask.scalar_type() == at::kBool,
      "apply_plan_: mask must be bool, got ",
      mask.scalar_type());
  TORCH_CHECK_VALUE(
      partner.device() == x.device() && mask.device() == x.device(),
      "apply_plan_: partner and mask must be on x's device ",
      x.device());
  TORCH_CHECK_VALUE(
      partner.is_contiguous() && mask.is_contiguous(),
      "apply_plan_: partner and mask must be contiguous");

  const int64_t n = x.size(0);
  const bool has_channels = x.dim() == 4;
  const int64_t c = has_channels ? x.size(1) : 1;
  const int64_t h = x.size(has_channels ? 2 : 1);
  const int64_t w = x.size(has_channels ? 3 : 2);
  const int64_t grid_h = ceil_div(h, patch_h);
  const int64_t grid_w = ceil_div(w, patch_w);
  TORCH_CHECK_VALUE(
      partner.dim() == 1 && partner.size(0) == n,
      "apply_plan_: partner must have shape (",
      n,
      ",), got ",
      partner.sizes());
  TORCH_CHECK_VALUE(
      mask.dim() == 3 && mask.size(0) == n && mask.size(1) == grid_h &&
          mask.size(2) == grid_w,
      "apply_plan_: mask must have shape (",
      n,
      ", ",
      grid_h,
      ", ",
      grid_w,
      ") for patch size (",
      patch_h,
      ", ",
      patch_w,
      "), got ",
      mask.sizes());

  if (x.numel() == 0) {
    return 0;
  }
  // In channels_last the C channels of a pixel sit next to each other, so a
  // cell's row is one run of patch_w * C elements in a single plane.
  const bool planar = x.is_contiguous();
  const int64_t elems_per_col = planar ? 1 : c;
  const int64_t item = x.element_size();
  const int64_t row_bytes = w * elems_per_col * item;
  const int64_t cell_bytes = std::min(patch_w, w) * elems_per_col * item;
  const auto address = reinterpret_cast<uintptr_t>(x.data_ptr());
  int64_t unit = max_unit_bytes;
  while (unit > 1 &&
         (row_bytes % unit != 0 || cell_bytes % unit != 0 ||
          address % unit != 0)) {
    unit /= 2;
  }
  layout->planes = planar ? c : 1;
  layout->rows = h;
  layout->row_units = row_bytes / unit;
  layout->cell_rows = patch_h;
  layout->cell_units = cell_bytes / unit;
  layout->grid_w = grid_w;
  layout->cells = grid_h * grid_w;
  return unit;
}

} // namespace ipsd

TORCH_LIBRARY(ipsd_cuda, m) {
  m.def(
      "apply_plan_(Tensor(a!) x, Tensor partner, Tensor mask, int patch_h, "
      "int patch_w) -> ()");
}

// A module object so that `import ipsd_cuda._C` loads the library (and runs
// the registrations above); the ops themselves live in torch.ops.ipsd_cuda.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddIntConstant(module, "WITH_CUDA", IPSD_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
