// CUDA kernel of ipsd_cuda::apply_plan_.
//
// One block per (sample, cell): the block returns at once unless the sample
// is the lower member of a pair and the cell is in the plan's mask, so cells
// that are not swapped cost a two-word read and no data traffic. Inside a
// moved cell, consecutive threads take consecutive units of a run, and a unit
// is the widest word (up to 16 bytes) that the runs' alignment allows.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../swap.h"

namespace ipsd {
namespace {

constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

template <typename unit_t, typename index_t>
__global__ void swap_cells_kernel(
    unit_t* __restrict__ data,
    const int64_t* __restrict__ partner,
    const bool* __restrict__ mask,
    int64_t n,
    SwapLayout l) {
  const int64_t sample = l.sample_units();
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    for (int64_t cell = blockIdx.x; cell < l.cells; cell += gridDim.x) {
      if (!moves_cell(partner, mask, n, l.cells, i, cell)) {
        continue;
      }
      unit_t* a = data + i * sample;
      unit_t* b = data + partner[i] * sample;
      const CellBox box = cell_box(l, cell);
      const index_t count = static_cast<index_t>(box.units(l.planes));
      for (index_t k = threadIdx.x; k < count; k += blockDim.x) {
        const index_t off = cell_unit_offset<index_t>(l, box, k);
        const unit_t va = a[off];
        const unit_t vb = b[off];
        a[off] = vb;
        b[off] = va;
      }
    }
  }
}

template <typename unit_t>
void launch(
    const at::Tensor& x,
    const at::Tensor& partner,
    const at::Tensor& mask,
    const SwapLayout& l) {
  const int64_t n = x.size(0);
  // Enough threads to cover a full cell once (whole warps, at most 256), so
  // small cells do not leave most of a block idle.
  const int64_t full_cell = l.planes * std::min(l.cell_rows, l.rows) *
      std::min(l.cell_units, l.row_units);
  const int threads =
      static_cast<int>(std::clamp<int64_t>((full_cell + 31) / 32 * 32, 32, 256));
  const dim3 grid(
      static_cast<unsigned>(std::min(l.cells, kMaxGridX)),
      static_cast<unsigned>(std::min(n, kMaxGridY)));
  auto* data = static_cast<unit_t*>(x.data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  // 32-bit offsets inside a sample are cheaper; samples beyond 2^31 units
  // take the 64-bit instance. The sample base is always 64-bit.
  if (l.sample_units() <= std::numeric_limits<int32_t>::max()) {
    swap_cells_kernel<unit_t, int32_t><<<grid, threads, 0, stream>>>(
        data, partner.data_ptr<int64_t>(), mask.data_ptr<bool>(), n, l);
  } else {
    swap_cells_kernel<unit_t, int64_t><<<grid, threads, 0, stream>>>(
        data, partner.data_ptr<int64_t>(), mask.data_ptr<bool>(), n, l);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply_plan_cuda(
    at::Tensor& x,
    const at::Tensor& partner,
    const at::Tensor& mask,
    int64_t patch_h,
    int64_t patch_w) {
  SwapLayout l;
  const int64_t unit =
      plan_layout(x, partner, mask, patch_h, patch_w, sizeof(uint4), &l);
  if (unit == 0 || l.cells == 0 || x.size(0) < 2) {
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  switch (unit) {
    case 1:
      return launch<uint8_t>(x, partner, mask, l);
    case 2:
      return launch<uint16_t>(x, partner, mask, l);
    case 4:
      return launch<uint32_t>(x, partner, mask, l);
    case 8:
      return launch<uint2>(x, partner, mask, l);
    default:
      return launch<uint4>(x, partner, mask, l);
  }
}

} // namespace
} // namespace ipsd

TORCH_LIBRARY_IMPL(ipsd_cuda, CUDA, m) {
  m.impl("apply_plan_", &ipsd::apply_plan_cuda);
}
