// The ops' schemas, their argument checks and the Python module stub.
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

// The cell grid (gh, gw) of x for a patch size, checking x's rank and the
// patch size.
std::pair<int64_t, int64_t> grid_of(
    const at::Tensor& x, int64_t patch_h, int64_t patch_w) {
  TORCH_CHECK_VALUE(
      x.dim() == 3 || x.dim() == 4,
      "x must be (N, H, W) or (N, C, H, W), got shape ",
      x.sizes());
  TORCH_CHECK_VALUE(
      patch_h >= 1 && patch_w >= 1,
      "patch size must be >= 1, got (",
      patch_h,
      ", ",
      patch_w,
      ")");
  return {ceil_div(x.size(-2), patch_h), ceil_div(x.size(-1), patch_w)};
}

// Checks that `x`, whose grid grid_of gave, can be swapped in place and
// describes it as a SwapLayout whose unit is the widest power of two, at most
// `max_unit_bytes`, that divides every run and the data pointer. Returns the
// unit size in bytes; 0 when there is nothing to move (an empty tensor).
int64_t layout_of(
    const at::Tensor& x,
    int64_t patch_h,
    int64_t patch_w,
    int64_t grid_h,
    int64_t grid_w,
    int64_t max_unit_bytes,
    SwapLayout* layout) {
  TORCH_CHECK_VALUE(
      x.is_contiguous() ||
          (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
      "x must be contiguous or channels_last to be swapped in place, got "
      "strides ",
      x.strides());
  const int64_t c = x.dim() == 4 ? x.size(1) : 1;
  const int64_t h = x.size(-2);
  const int64_t w = x.size(-1);
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

} // namespace

int64_t plan_layout(
    const at::Tensor& x,
    const at::Tensor& partner,
    const at::Tensor& mask,
    int64_t patch_h,
    int64_t patch_w,
    int64_t max_unit_bytes,
    SwapLayout* layout) {
  const auto [grid_h, grid_w] = grid_of(x, patch_h, patch_w);
  TORCH_CHECK_TYPE(
      partner.scalar_type() == at::kLong,
      "partner must be int64, got ",
      partner.scalar_type());
  TORCH_CHECK_TYPE(
      mask.scalar_type() == at::kBool,
      "mask must be bool, got ",
      mask.scalar_type());
  TORCH_CHECK_VALUE(
      partner.device() == x.device() && mask.device() == x.device(),
      "partner and mask must be on x's device ",
      x.device());
  TORCH_CHECK_VALUE(
      partner.is_contiguous() && mask.is_contiguous(),
      "partner and mask must be contiguous");
  const int64_t n = x.size(0);
  TORCH_CHECK_VALUE(
      partner.dim() == 1 && partner.size(0) == n,
      "partner must have shape (",
      n,
      ",), got ",
      partner.sizes());
  TORCH_CHECK_VALUE(
      mask.dim() == 3 && mask.size(0) == n && mask.size(1) == grid_h &&
          mask.size(2) == grid_w,
      "mask must have shape (",
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
  return layout_of(x, patch_h, patch_w, grid_h, grid_w, max_unit_bytes, layout);
}

PlanArgs check_plan_args(
    const at::Tensor& labels,
    const at::Tensor& keys,
    const std::optional<at::Tensor>& pair_size,
    int64_t size,
    int64_t threshold,
    int64_t grid_h,
    int64_t grid_w,
    int64_t pairing,
    int64_t region,
    const c10::Device& device) {
  TORCH_CHECK_TYPE(
      labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong,
      "labels must be int32 or int64, got ",
      labels.scalar_type());
  TORCH_CHECK_VALUE(
      labels.dim() == 1, "labels must be 1-d (N,), got shape ", labels.sizes());
  const int64_t n = labels.size(0);
  const int64_t pairs = n / 2;
  TORCH_CHECK_TYPE(
      keys.scalar_type() == at::kLong,
      "keys must be int64, got ",
      keys.scalar_type());
  TORCH_CHECK_VALUE(
      keys.dim() == 1 && keys.size(0) == n + pairs,
      "keys must have shape (",
      n + pairs,
      ",) for N = ",
      n,
      " (N pairing keys, then N // 2 pair keys), got ",
      keys.sizes());
  bool dense = labels.is_contiguous() && keys.is_contiguous();
  bool same_device = labels.device() == device && keys.device() == device;
  if (pair_size.has_value()) {
    TORCH_CHECK_TYPE(
        pair_size->scalar_type() == at::kLong,
        "pair_size must be int64, got ",
        pair_size->scalar_type());
    TORCH_CHECK_VALUE(
        pair_size->dim() == 1 && pair_size->size(0) == pairs,
        "pair_size must have shape (",
        pairs,
        ",), got ",
        pair_size->sizes());
    dense = dense && pair_size->is_contiguous();
    same_device = same_device && pair_size->device() == device;
  }
  TORCH_CHECK_VALUE(
      same_device, "labels, keys and pair_size must be on the device ", device);
  TORCH_CHECK_VALUE(dense, "labels, keys and pair_size must be contiguous");
  TORCH_CHECK_VALUE(size >= 0, "size must be >= 0, got ", size);
  TORCH_CHECK_VALUE(
      threshold >= 0 && threshold <= (int64_t{1} << kHalfBits),
      "threshold must be in [0, 2^31], got ",
      threshold);
  TORCH_CHECK_VALUE(
      grid_h >= 0 && grid_w >= 0 &&
          (grid_w == 0 || grid_h <= (int64_t{1} << kHalfBits) / grid_w),
      "the grid must have at most 2^31 cells, got (",
      grid_h,
      ", ",
      grid_w,
      ")");
  TORCH_CHECK_VALUE(
      pairing == kPairClasses || pairing == kPairHalves || pairing == kPairAny,
      "pairing must be 0 (random), 1 (halves) or 2 (any), got ",
      pairing);
  TORCH_CHECK_VALUE(
      region == kRegionCells || region == kRegionBox,
      "region must be 0 (cells) or 1 (box), got ",
      region);
  TORCH_CHECK_VALUE(
      pairing != kPairHalves || n % 2 == 0,
      "pairing='halves' needs an even batch size, got N = ",
      n);
  return PlanArgs{
      n,
      grid_h,
      grid_w,
      grid_h * grid_w,
      size,
      threshold,
      pairing,
      region,
      keys.data_ptr<int64_t>(),
      pair_size.has_value() ? pair_size->data_ptr<int64_t>() : nullptr};
}

SwapArgs check_swap_args(
    const at::Tensor& x,
    const at::Tensor& labels,
    const at::Tensor& keys,
    const std::optional<at::Tensor>& pair_size,
    int64_t size,
    int64_t threshold,
    int64_t patch_h,
    int64_t patch_w,
    int64_t pairing,
    int64_t region,
    int64_t max_unit_bytes) {
  const auto [grid_h, grid_w] = grid_of(x, patch_h, patch_w);
  TORCH_CHECK_VALUE(
      labels.dim() == 1 && labels.size(0) == x.size(0),
      "labels must have shape (",
      x.size(0),
      ",), got ",
      labels.sizes());
  SwapArgs args{
      check_plan_args(
          labels, keys, pair_size, size, threshold, grid_h, grid_w, pairing, region, x.device()),
      SwapLayout{},
      0};
  args.unit = layout_of(
      x, patch_h, patch_w, grid_h, grid_w, max_unit_bytes, &args.layout);
  return args;
}

CellGeometry check_pixels_args(
    const at::Tensor& mask, int64_t height, int64_t width, int64_t patch_h, int64_t patch_w) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 3, "mask must be (N, gh, gw), got shape ", mask.sizes());
  TORCH_CHECK_VALUE(mask.is_contiguous(), "mask must be contiguous");
  TORCH_CHECK_VALUE(
      height >= 0 && width >= 0 && patch_h >= 1 && patch_w >= 1 && patch_h <= std::max<int64_t>(height, 1) &&
          patch_w <= std::max<int64_t>(width, 1),
      "the image size must be >= 0 and the patch size in [1, max(size, 1)], got image (",
      height,
      ", ",
      width,
      ") and patch (",
      patch_h,
      ", ",
      patch_w,
      ")");
  TORCH_CHECK_VALUE(
      mask.size(1) == ceil_div(height, patch_h) && mask.size(2) == ceil_div(width, patch_w),
      "mask must have the grid (",
      ceil_div(height, patch_h),
      ", ",
      ceil_div(width, patch_w),
      ") of the image and patch size, got shape ",
      mask.sizes());
  return CellGeometry{height, width, patch_h, patch_w, mask.size(2), mask.size(1) * mask.size(2)};
}

PlanTensors empty_plan(
    const at::Tensor& labels, int64_t grid_h, int64_t grid_w) {
  const int64_t n = labels.size(0);
  const auto on = labels.options();
  return {
      at::empty({n}, on.dtype(at::kLong)),
      at::empty({n, grid_h, grid_w}, on.dtype(at::kBool)),
      at::empty({}, on.dtype(at::kLong))};
}

} // namespace ipsd

TORCH_LIBRARY(ipsd_cuda, m) {
  m.def(
      "apply_plan_(Tensor(a!) x, Tensor partner, Tensor mask, int patch_h, "
      "int patch_w) -> ()");
  // The plan from its keys (see plan_common.h): partner, mask, error.
  // pairing is a Pairing, region a Region; size (or pair_size, per pair) is
  // the region's size: a number of cells, or a box's scale.
  m.def(
      "make_plan(Tensor labels, Tensor keys, Tensor? pair_size, int size, "
      "int threshold, int grid_h, int grid_w, int pairing, int region) "
      "-> (Tensor, Tensor, Tensor)");
  // The pixels of each sample's masked cells (N,) int64, for images of
  // height x width cut into patch_h x patch_w cells.
  m.def(
      "exchanged_pixels(Tensor mask, int height, int width, int patch_h, "
      "int patch_w) -> Tensor");
  // make_plan and apply_plan_ on x in one call (one kernel on CUDA).
  m.def(
      "swap_(Tensor(a!) x, Tensor labels, Tensor keys, Tensor? pair_size, "
      "int size, int threshold, int patch_h, int patch_w, int pairing, "
      "int region) -> (Tensor, Tensor, Tensor)");
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
