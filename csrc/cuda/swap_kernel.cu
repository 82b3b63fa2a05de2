// CUDA kernels of the ipsd_cuda ops.
//
// apply_plan_: one warp per (sample, cell), several cells per block. A warp
// returns at once unless its sample is the lower member of a pair and its
// cell is in the plan's mask, so cells that are not swapped cost two small
// reads and no data traffic. Inside a moved cell, consecutive lanes take
// consecutive units of a run (coalesced), a unit is the widest word (up to
// 16 bytes) that the runs' alignment allows, and each lane keeps several
// loads in flight before it stores.
//
// make_plan and swap_: two kernels after the one draw of keys, and no host
// synchronisation. pair_samples_kernel places each sample in the pairing
// order (one thread per sample, counting over shared-memory tiles of the
// batch); choose_cells_kernel then takes one leading sample per block row,
// numbers its pair by counting the leaders placed before it, ranks the
// pair's cells (one warp per cell) or places its box and, for swap_,
// exchanges the chosen cells at once, with the apply kernel's per-warp cell
// copy.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../swap.h"

namespace ipsd {
namespace {

constexpr int kWarp = 32;
constexpr int kCellsPerBlock = 8;
constexpr int kCellThreads = kWarp * kCellsPerBlock;
constexpr int kUnroll = 4;
constexpr int kPairThreads = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

// One warp exchanges one cell between samples a and b (whole units).
template <typename unit_t, typename index_t>
__device__ __forceinline__ void swap_cell(
    unit_t* __restrict__ a,
    unit_t* __restrict__ b,
    const SwapLayout& l,
    int64_t cell) {
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

template <typename unit_t, typename index_t>
__global__ void __launch_bounds__(kCellThreads) apply_plan_kernel(
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
      if (moves_cell(partner, mask, n, l.cells, i, cell)) {
        swap_cell<unit_t, index_t>(
            data + i * sample, data + partner[i] * sample, l, cell);
      }
    }
  }
}

// Places every sample in the pairing order: its partner, its position, and
// at that position whether it leads a pair (flag). With pairing="halves",
// i pairs with i + N/2 when their labels agree, and flag[i] marks a pair
// whose labels differ (left unpaired). pairing="any" takes every label as 0.
template <typename label_t>
__global__ void __launch_bounds__(kPairThreads) pair_samples_kernel(
    const label_t* __restrict__ labels,
    const int64_t* __restrict__ keys,
    int64_t n,
    int64_t pairing,
    int64_t* __restrict__ partner,
    int64_t* __restrict__ position,
    uint8_t* __restrict__ flag) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPairThreads + threadIdx.x;
  if (pairing == kPairHalves) {
    const int64_t half = n / 2;
    if (i < half) {
      const bool same = labels[i] == labels[i + half];
      partner[i] = same ? i + half : -1;
      partner[i + half] = same ? i : -1;
      flag[i] = !same;
    }
    return;
  }
  __shared__ label_t tile_label[kPairThreads];
  __shared__ int64_t tile_key[kPairThreads];
  const bool valid = i < n;
  const bool any = pairing == kPairAny;
  SampleScan<label_t> scan(valid && !any ? labels[i] : label_t{0}, valid ? keys[i] : 0, i);
  for (int64_t base = 0; base < n; base += kPairThreads) {
    const int64_t j = base + threadIdx.x;
    if (j < n) {
      tile_label[threadIdx.x] = any ? label_t{0} : labels[j];
      tile_key[threadIdx.x] = keys[j];
    }
    __syncthreads();
    const int count = n - base < kPairThreads ? static_cast<int>(n - base) : kPairThreads;
    if (valid) {
      for (int t = 0; t < count; ++t) {
        scan.visit(tile_label[t], tile_key[t], base + t);
      }
    }
    __syncthreads();
  }
  if (valid) {
    const int64_t pos = scan.position();
    position[i] = pos;
    flag[pos] = scan.leads();
    partner[i] = scan.partner();
  }
}

// What choose_cells_kernel reads and writes besides the data.
struct CellPlan {
  PlanArgs a;
  const int64_t* partner;
  const int64_t* position;  // "random" only
  const uint8_t* flag;
  bool* mask;
  int64_t* error;
};

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// One block writes the plan's error: the first i < N/2 whose pair was left
// unpaired by pairing="halves", else -1.
__device__ void write_error(const CellPlan& p, int tid) {
  if (!p.a.halves()) {
    if (tid == 0) {
      *p.error = -1;
    }
    return;
  }
  __shared__ unsigned long long first;
  if (tid == 0) {
    first = std::numeric_limits<unsigned long long>::max();
  }
  __syncthreads();
  for (int64_t i = tid; i < p.a.n / 2; i += kCellThreads) {
    if (p.flag[i] != 0) {
      atomicMin(&first, static_cast<unsigned long long>(i));
      break;
    }
  }
  __syncthreads();
  if (tid == 0) {
    *p.error = first == std::numeric_limits<unsigned long long>::max()
        ? -1
        : static_cast<int64_t>(first);
  }
}

// Block row i: if sample i leads a pair, the pair's cells (one warp each)
// are ranked in cell_order and the first k chosen (or, in the "box" region,
// those inside its box), in the masks of both members and, when data is
// given, exchanged. Unpaired samples get an empty mask; the other member of
// a pair is written by its leader.
template <typename unit_t, typename index_t>
__global__ void __launch_bounds__(kCellThreads) choose_cells_kernel(
    CellPlan p,
    unit_t* __restrict__ data,
    SwapLayout l) {
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  const int64_t n = p.a.n;
  const int64_t cells = p.a.cells;
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    write_error(p, tid);
  }
  const int64_t first_cell = static_cast<int64_t>(blockIdx.x) * kCellsPerBlock + threadIdx.y;
  const int64_t cell_step = static_cast<int64_t>(gridDim.x) * kCellsPerBlock;
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    // Every branch below depends on i alone: the whole block takes it.
    const int64_t j = p.partner[i];
    if (j < 0) {
      for (int64_t c = first_cell; c < cells && threadIdx.x == 0; c += cell_step) {
        p.mask[i * cells + c] = false;
      }
      continue;
    }
    if (p.a.halves() ? i >= n / 2 : p.flag[p.position[i]] == 0) {
      continue;
    }
    int64_t pair = i;
    if (!p.a.halves()) {
      // Pairs are numbered by their leader's position.
      const int64_t pos = p.position[i];
      pair = 0;
      for (int64_t base = 0; base < pos; base += kCellThreads) {
        const int64_t t = base + tid;
        pair += __syncthreads_count(t < pos && p.flag[t] != 0);
      }
    }
    const int64_t key = p.a.keys[n + pair];
    const int64_t size = p.a.size_of(pair);
    const bool active = size > 0 && pair_active(key, p.a.threshold);
    const uint32_t seed = pair_seed(key);
    const bool boxed = p.a.region == kRegionBox;
    const CellRect box = boxed && active ? pair_box(seed, size, p.a.grid_h, p.a.grid_w) : CellRect{0, 0, 0, 0};
    for (int64_t c = first_cell; c < cells; c += cell_step) {
      bool chosen = false;
      if (boxed) {
        chosen = box.contains(c / p.a.grid_w, c % p.a.grid_w);
      } else if (active) {
        const uint64_t mine = cell_order(seed, c);
        int ahead = 0;
        for (int64_t other = threadIdx.x; other < cells; other += kWarp) {
          ahead += cell_order(seed, other) < mine;
        }
        chosen = warp_sum(ahead) < size;
      }
      if (threadIdx.x == 0) {
        p.mask[i * cells + c] = chosen;
        p.mask[j * cells + c] = chosen;
      }
      if (chosen && data != nullptr) {
        const int64_t sample = l.sample_units();
        swap_cell<unit_t, index_t>(data + i * sample, data + j * sample, l, c);
      }
    }
  }
}

// Block i sums the pixels of sample i's masked cells: each thread a strided
// share of the cells, then a reduction in shared memory.
__global__ void __launch_bounds__(kPairThreads) exchanged_pixels_kernel(
    const bool* __restrict__ mask, CellGeometry g, int64_t n, int64_t* __restrict__ pixels) {
  __shared__ int64_t partial[kPairThreads];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    int64_t sum = 0;
    for (int64_t c = threadIdx.x; c < g.cells; c += kPairThreads) {
      if (mask[i * g.cells + c]) {
        const int64_t row = c / g.grid_w;
        sum += g.pixels(row, c - row * g.grid_w);
      }
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kPairThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) {
        partial[threadIdx.x] += partial[threadIdx.x + half];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      pixels[i] = partial[0];
    }
    // partial[0] is read before the next sample overwrites it.
    __syncthreads();
  }
}

dim3 cell_grid(int64_t cells, int64_t n) {
  return dim3(
      static_cast<unsigned>(std::min(
          std::max<int64_t>(1, (cells + kCellsPerBlock - 1) / kCellsPerBlock),
          kMaxGridX)),
      static_cast<unsigned>(std::min(n, kMaxGridY)));
}

// Calls fn(unit_t*, index_t) for the unit width and the index type that the
// layout needs: 32-bit offsets inside a sample are cheaper; samples beyond
// 2^30 units (with headroom for k0 + kWarp * kUnroll) take 64-bit ones. The
// sample base is always 64-bit.
template <typename Fn>
void dispatch_unit(int64_t unit, void* data, const SwapLayout& l, Fn&& fn) {
  const bool small = l.sample_units() <= (int64_t{1} << 30);
  auto with_index = [&](auto* typed) {
    if (small) {
      fn(typed, int32_t{0});
    } else {
      fn(typed, int64_t{0});
    }
  };
  switch (unit) {
    case 1:
      return with_index(static_cast<uint8_t*>(data));
    case 2:
      return with_index(static_cast<uint16_t*>(data));
    case 4:
      return with_index(static_cast<uint32_t*>(data));
    case 8:
      return with_index(static_cast<uint2*>(data));
    default:
      return with_index(static_cast<uint4*>(data));
  }
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
  const int64_t n = x.size(0);
  if (unit == 0 || n < 2) {
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_unit(unit, x.data_ptr(), l, [&](auto* data, auto index) {
    using unit_t = std::remove_pointer_t<decltype(data)>;
    using index_t = decltype(index);
    apply_plan_kernel<unit_t, index_t>
        <<<cell_grid(l.cells, n), dim3(kWarp, kCellsPerBlock), 0, stream>>>(
            data, partner.data_ptr<int64_t>(), mask.data_ptr<bool>(), n, l);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Draws the plan into freshly allocated tensors and, when x is given (with
// its layout and unit), exchanges the chosen cells of x in the same kernel.
PlanTensors run_plan(
    const at::Tensor& labels,
    const PlanArgs& a,
    at::Tensor* x,
    const SwapLayout& l,
    int64_t unit) {
  PlanTensors plan = empty_plan(labels, a.grid_h, a.grid_w);
  at::Tensor& partner = std::get<0>(plan);
  at::Tensor& error = std::get<2>(plan);
  if (a.n == 0) {
    error.fill_(-1);
    return plan;
  }
  const c10::cuda::CUDAGuard guard(labels.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto bytes = labels.options().dtype(at::kByte);
  at::Tensor position = at::empty({a.halves() ? 0 : a.n}, labels.options().dtype(at::kLong));
  at::Tensor flag = at::empty({a.n}, bytes);
  const auto blocks = static_cast<unsigned>((a.n + kPairThreads - 1) / kPairThreads);
  AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "pair_samples", [&] {
    pair_samples_kernel<index_t><<<blocks, kPairThreads, 0, stream>>>(
        labels.data_ptr<index_t>(),
        a.keys,
        a.n,
        a.pairing,
        partner.data_ptr<int64_t>(),
        position.data_ptr<int64_t>(),
        flag.data_ptr<uint8_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const CellPlan p{
      a,
      partner.data_ptr<int64_t>(),
      position.data_ptr<int64_t>(),
      flag.data_ptr<uint8_t>(),
      std::get<1>(plan).data_ptr<bool>(),
      error.data_ptr<int64_t>()};
  const dim3 grid = cell_grid(a.cells, a.n);
  const dim3 block(kWarp, kCellsPerBlock);
  if (x == nullptr || unit == 0) {
    choose_cells_kernel<uint8_t, int32_t><<<grid, block, 0, stream>>>(p, nullptr, l);
  } else {
    dispatch_unit(unit, x->data_ptr(), l, [&](auto* data, auto index) {
      using unit_t = std::remove_pointer_t<decltype(data)>;
      choose_cells_kernel<unit_t, decltype(index)><<<grid, block, 0, stream>>>(p, data, l);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

at::Tensor exchanged_pixels_cuda(
    const at::Tensor& mask, int64_t height, int64_t width, int64_t patch_h, int64_t patch_w) {
  const CellGeometry g = check_pixels_args(mask, height, width, patch_h, patch_w);
  const int64_t n = mask.size(0);
  at::Tensor pixels = at::empty({n}, mask.options().dtype(at::kLong));
  if (n == 0) {
    return pixels;
  }
  const c10::cuda::CUDAGuard guard(mask.device());
  const auto blocks = static_cast<unsigned>(std::min(n, kMaxGridX));
  exchanged_pixels_kernel<<<blocks, kPairThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.data_ptr<bool>(), g, n, pixels.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pixels;
}

PlanTensors make_plan_cuda(
    const at::Tensor& labels,
    const at::Tensor& keys,
    const std::optional<at::Tensor>& pair_size,
    int64_t size,
    int64_t threshold,
    int64_t grid_h,
    int64_t grid_w,
    int64_t pairing,
    int64_t region) {
  const PlanArgs a = check_plan_args(
      labels, keys, pair_size, size, threshold, grid_h, grid_w, pairing, region, labels.device());
  return run_plan(labels, a, nullptr, SwapLayout{}, 0);
}

PlanTensors swap_cuda(
    at::Tensor& x,
    const at::Tensor& labels,
    const at::Tensor& keys,
    const std::optional<at::Tensor>& pair_size,
    int64_t size,
    int64_t threshold,
    int64_t patch_h,
    int64_t patch_w,
    int64_t pairing,
    int64_t region) {
  const SwapArgs s = check_swap_args(
      x, labels, keys, pair_size, size, threshold, patch_h, patch_w, pairing, region, sizeof(uint4));
  return run_plan(labels, s.plan, &x, s.layout, s.unit);
}

} // namespace
} // namespace ipsd

TORCH_LIBRARY_IMPL(ipsd_cuda, CUDA, m) {
  m.impl("apply_plan_", &ipsd::apply_plan_cuda);
  m.impl("exchanged_pixels", &ipsd::exchanged_pixels_cuda);
  m.impl("make_plan", &ipsd::make_plan_cuda);
  m.impl("swap_", &ipsd::swap_cuda);
}
