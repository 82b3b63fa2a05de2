// CUDA kernel of ipsd_cuda::apply_plan_.
//
// One warp per (sample, cell), several cells per block. A warp returns at
// once unless its sample is the lower member of a pair and its cell is in
// the plan's mask, so cells that are not swapped cost two small reads and no
// data traffic. Inside a moved cell, consecutive lanes take consecutive units
// of a run (coalesced), a unit is the widest word (up to 16 bytes) that the
// runs' alignment allows, and each lane keeps several loads in flight before
// it stores.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../swap.h"

namespace ipsd {
namespace {

constexpr int kWarp = 32;
constexpr int kCellsPerBlock = 8;
constexpr int kUnroll = 4;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

template <typename unit_t, typename index_t>
__global__ void __launch_bounds__(kWarp* kCellsPerBlock) swap_cells_kernel(
    unit_t* __restrict__ data,
    const int64_t* __restrict__ partner,
    const bool* __restrict__ mask,
    int64_t n,
    SwapLayout l) {
  const int64_t sample = l.sample_units();
  const int64_t cell_step = static_cast<int64_t>(gridDim.x) * kCellsPerBlock;
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    for (int64_t cell = static_cast<int64_t>(blockIdx.x) * kCellsPerBlock + threadIdx.y;
         cell < l.cells;
         cell += cell_step) {
      if (!moves_cell(partner, mask, n, l.cells, i, cell)) {
        continue;
      }
      unit_t* a = data + i * sample;
      unit_t* b = data + partner[i] * sample;
      const CellBox box = cell_box(l, cell);
      const index_t count = static_cast<index_t>(box.units(l.planes));
      for (index_t k0 = threadIdx.x; k0 < count; k0 += kWarp * kUnroll) {
        index_t off[kUnroll];
        unit_t va[kUnroll];
        unit_t vb[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const index_t k = k0 + u * kWarp;
          if (k < count) {
            off[u] = cell_unit_offset<index_t>(l, box, k);
            va[u] = a[off[u]];
            vb[u] = b[off[u]];
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (k0 + u * kWarp < count) {
            a[off[u]] = vb[u];
            b[off[u]] = va[u];
          }
        }
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
  const dim3 block(kWarp, kCellsPerBlock);
  const dim3 grid(
      static_cast<unsigned>(std::min(
          (l.cells + kCellsPerBlock - 1) / kCellsPerBlock, kMaxGridX)),
      static_cast<unsigned>(std::min(n, kMaxGridY)));
  auto* data = static_cast<unit_t*>(x.data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  // 32-bit offsets inside a sample are cheaper; samples beyond 2^30 units
  // (with headroom for k0 + kWarp * kUnroll) take the 64-bit instance. The
  // sample base is always 64-bit.
  if (l.sample_units() <= (int64_t{1} << 30)) {
    swap_cells_kernel<unit_t, int32_t><<<grid, block, 0, stream>>>(
        data, partner.data_ptr<int64_t>(), mask.data_ptr<bool>(), n, l);
  } else {
    swap_cells_kernel<unit_t, int64_t><<<grid, block, 0, stream>>>(
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
  if (unit == 0 || x.size(0) < 2) {
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
