// CPU kernel of ipsd_cuda::apply_plan_, for data-loader workers and CPU
// training. Parallel over (pair, grid row); each pair is moved by its lower
// member.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../swap.h"

namespace ipsd {
namespace {

// Swap two non-overlapping runs; __restrict__ lets the compiler vectorise
// the loop for every unit width.
template <typename unit_t>
void swap_run(unit_t* __restrict__ a, unit_t* __restrict__ b, int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    const unit_t t = a[k];
    a[k] = b[k];
    b[k] = t;
  }
}

template <typename unit_t>
void swap_cells(
    unit_t* data,
    const int64_t* partner,
    const bool* mask,
    int64_t n,
    const SwapLayout& l) {
  // Listing the pairs first gives every task whole pairs to move, whatever
  // the pairing: with pairing="halves" all lower members sit in the first
  // half, and a split over samples would idle half the threads.
  std::vector<int64_t> leaders;
  for (int64_t i = 0; i < n; ++i) {
    if (leads_pair(partner, n, i)) {
      leaders.push_back(i);
    }
  }
  const int64_t sample = l.sample_units();
  const int64_t grid_h = l.cells / l.grid_w;
  // A task item is one grid row of one pair; a task moves at least ~64 KiB
  // when its cells are swapped.
  const int64_t band_bytes = std::max<int64_t>(
      1,
      l.planes * std::min(l.cell_rows, l.rows) * l.row_units *
          int64_t{sizeof(unit_t)});
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / band_bytes);
  const int64_t items = static_cast<int64_t>(leaders.size()) * grid_h;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = leaders[item / grid_h];
      const int64_t grid_row = item % grid_h;
      const bool* row_mask = mask + i * l.cells + grid_row * l.grid_w;
      unit_t* a = data + i * sample;
      unit_t* b = data + partner[i] * sample;
      // Adjacent masked cells are one run per image row: fewer, longer swaps
      // where cells are only a few bytes wide.
      for (int64_t col = 0; col < l.grid_w;) {
        if (!row_mask[col]) {
          ++col;
          continue;
        }
        int64_t col_end = col + 1;
        while (col_end < l.grid_w && row_mask[col_end]) {
          ++col_end;
        }
        const CellBox box = cell_span(l, grid_row, col, col_end);
        for (int64_t plane = 0; plane < l.planes; ++plane) {
          for (int64_t row = 0; row < box.row_count; ++row) {
            const int64_t off = run_offset<int64_t>(l, box, plane, row);
            swap_run(a + off, b + off, box.unit_count);
          }
        }
        col = col_end;
      }
    }
  });
}

void apply_plan_cpu(
    at::Tensor& x,
    const at::Tensor& partner,
    const at::Tensor& mask,
    int64_t patch_h,
    int64_t patch_w) {
  SwapLayout l;
  // Wider units than 8 bytes buy nothing here: the compiler widens the loop.
  const int64_t unit =
      plan_layout(x, partner, mask, patch_h, patch_w, sizeof(uint64_t), &l);
  const int64_t n = x.size(0);
  const int64_t* p = partner.data_ptr<int64_t>();
  const bool* m = mask.data_ptr<bool>();
  void* data = x.data_ptr();
  switch (unit) {
    case 0:
      return;
    case 1:
      return swap_cells(static_cast<uint8_t*>(data), p, m, n, l);
    case 2:
      return swap_cells(static_cast<uint16_t*>(data), p, m, n, l);
    case 4:
      return swap_cells(static_cast<uint32_t*>(data), p, m, n, l);
    default:
      return swap_cells(static_cast<uint64_t*>(data), p, m, n, l);
  }
}

} // namespace
} // namespace ipsd

TORCH_LIBRARY_IMPL(ipsd_cuda, CPU, m) {
  m.impl("apply_plan_", &ipsd::apply_plan_cpu);
}
