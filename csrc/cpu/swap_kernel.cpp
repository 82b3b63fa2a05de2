// CPU kernels of the ipsd_cuda ops, for data-loader workers and CPU
// training. The plan sorts the samples and selects each pair's cells
// (plan_common.h defines the orders); applying it is parallel over
// (pair, grid row), each pair moved by its lower member.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// Exchange, between two rows, the units where `select` is all ones: a full
// pass over the row, but one that vectorises, which beats run-by-run swaps
// when the runs are only a few bytes long.
template <typename unit_t>
void swap_selected(
    unit_t* __restrict__ a,
    unit_t* __restrict__ b,
    const unit_t* __restrict__ select,
    int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    const unit_t x = a[k];
    const unit_t y = b[k];
    const unit_t m = select[k];
    a[k] = (x & ~m) | (y & m);
    b[k] = (y & ~m) | (x & m);
  }
}

// Wider units than 8 bytes buy nothing here: the compiler widens the loops.
constexpr int64_t kMaxUnitBytes = sizeof(uint64_t);

// Cells narrower than this many bytes are swapped by selection, wider ones
// run by run. Measured on 256x3x32x32 batches: 4-byte runs (uint8, 4-pixel
// cells) cost several copies of the batch run by run, about two by
// selection; from 16 bytes (float32 at 4 pixels, float16 at 8) runs were
// faster than selection (0.6-0.8 against 1.0 copies for float32).
constexpr int64_t kSelectBelowBytes = 16;

// Fills `select` (one plane of the sample: rows x row_units) with all ones in
// the units of the sample's masked cells, zeros elsewhere. Every plane of a
// sample has the same cells, so one pattern serves them all.
template <typename unit_t>
void select_cells(const SwapLayout& l, const bool* sample_mask, std::vector<unit_t>* select) {
  select->resize(l.rows * l.row_units);
  const int64_t grid_h = l.cells / l.grid_w;
  for (int64_t grid_row = 0; grid_row < grid_h; ++grid_row) {
    const CellBox band = cell_span(l, grid_row, 0, l.grid_w);
    unit_t* first_row = select->data() + band.row0 * l.row_units;
    for (int64_t col = 0; col < l.grid_w; ++col) {
      const CellBox cell = cell_span(l, grid_row, col, col + 1);
      std::fill_n(
          first_row + cell.unit0,
          cell.unit_count,
          sample_mask[grid_row * l.grid_w + col] ? static_cast<unit_t>(~unit_t{0}) : unit_t{0});
    }
    for (int64_t row = 1; row < band.row_count; ++row) {
      std::copy_n(first_row, l.row_units, first_row + row * l.row_units);
    }
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
  // half, and a split over samples would idle half the threads. Pairs that
  // exchange nothing (inactive ones) are left out. The same pass counts the
  // runs of adjacent exchanged cells in a grid row, which decide the method.
  std::vector<int64_t> leaders;
  int64_t cells = 0;
  int64_t runs = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!leads_pair(partner, n, i)) {
      continue;
    }
    const bool* m = mask + i * l.cells;
    int64_t pair_cells = 0;
    int64_t pair_runs = 0;
    for (int64_t c = 0; c < l.cells; ++c) {
      pair_cells += m[c];
      pair_runs += m[c] && (c % l.grid_w == 0 || !m[c - 1]);
    }
    if (pair_cells > 0) {
      leaders.push_back(i);
      cells += pair_cells;
      runs += pair_runs;
    }
  }
  const int64_t sample = l.sample_units();
  const int64_t pairs = static_cast<int64_t>(leaders.size());
  const int64_t unit_bytes = sizeof(unit_t);
  if (cells * l.cell_units * unit_bytes < runs * kSelectBelowBytes) {
    // A task moves at least ~64 KiB.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (2 * sample * unit_bytes));
    const int64_t plane = l.rows * l.row_units;
    at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
      std::vector<unit_t> select;
      for (int64_t s = begin; s < end; ++s) {
        const int64_t i = leaders[s];
        select_cells(l, mask + i * l.cells, &select);
        unit_t* a = data + i * sample;
        unit_t* b = data + partner[i] * sample;
        for (int64_t p = 0; p < l.planes; ++p) {
          swap_selected(a + p * plane, b + p * plane, select.data(), plane);
        }
      }
    });
    return;
  }
  const int64_t grid_h = l.cells / l.grid_w;
  // A task item is one grid row of one pair; a task moves at least ~64 KiB
  // when its cells are swapped.
  const int64_t band_bytes = std::max<int64_t>(
      1, l.planes * std::min(l.cell_rows, l.rows) * l.row_units * unit_bytes);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / band_bytes);
  at::parallel_for(0, pairs * grid_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = leaders[item / grid_h];
      const int64_t grid_row = item % grid_h;
      const bool* row_mask = mask + i * l.cells + grid_row * l.grid_w;
      unit_t* a = data + i * sample;
      unit_t* b = data + partner[i] * sample;
      // Adjacent masked cells are one run per image row: fewer, longer swaps.
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

// Pairs the samples (partner) and lists each pair's leading sample, in pair
// order (-1 for a pair of pairing="halves" whose labels differ). Returns the
// first such i, or -1.
template <typename label_t>
int64_t pair_samples(
    const label_t* labels,
    const PlanArgs& a,
    int64_t* partner,
    std::vector<int64_t>* leaders) {
  const int64_t n = a.n;
  std::fill(partner, partner + n, int64_t{-1});
  if (a.halves()) {
    const int64_t half = n / 2;
    int64_t error = -1;
    leaders->assign(half, -1);
    for (int64_t i = 0; i < half; ++i) {
      if (labels[i] == labels[i + half]) {
        partner[i] = i + half;
        partner[i + half] = i;
        (*leaders)[i] = i;
      } else if (error < 0) {
        error = i;
      }
    }
    return error;
  }
  // Sorting the sort keys themselves, not indices into them, saves a pair
  // of dependent loads per comparison (the sort took most of a small
  // batch's plan). pairing="any" orders the samples as if they all had
  // label 0.
  struct Sample {
    label_t label;
    int64_t key;
    int64_t index;
  };
  const bool any = a.pairing == kPairAny;
  std::vector<Sample> order(n);
  for (int64_t i = 0; i < n; ++i) {
    order[i] = Sample{any ? label_t{0} : labels[i], a.keys[i], i};
  }
  std::sort(order.begin(), order.end(), [](const Sample& x, const Sample& y) {
    return sample_before(x.label, x.key, x.index, y.label, y.key, y.index);
  });
  leaders->clear();
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin + 1;
    while (end < n && order[end].label == order[begin].label) {
      ++end;
    }
    for (int64_t r = begin; r + 1 < end; r += 2) {
      partner[order[r].index] = order[r + 1].index;
      partner[order[r + 1].index] = order[r].index;
      leaders->push_back(order[r].index);
    }
    begin = end;
  }
  return -1;
}

// Sets, for every active pair, its region's cells (the k that come first in
// cell_order, or its box) in the masks of both members.
void choose_cells(
    const PlanArgs& a,
    const std::vector<int64_t>& leaders,
    const int64_t* partner,
    bool* mask) {
  const int64_t cells = a.cells;
  std::fill(mask, mask + a.n * cells, false);
  if (cells == 0) {
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / cells);
  const int64_t pairs = static_cast<int64_t>(leaders.size());
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    CellChooser chooser;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i = leaders[s];
      const int64_t key = a.keys[a.n + s];
      const int64_t size = a.size_of(s);
      if (i < 0 || !pair_active(key, a.threshold) || size <= 0) {
        continue;
      }
      bool* mi = mask + i * cells;
      bool* mj = mask + partner[i] * cells;
      if (a.region == kRegionBox) {
        const CellRect box = pair_box(pair_seed(key), size, a.grid_h, a.grid_w);
        for (int64_t row = box.top; row < box.top + box.rows; ++row) {
          std::fill_n(mi + row * a.grid_w + box.left, box.cols, true);
        }
      } else if (size >= cells) {
        std::fill(mi, mi + cells, true);
      } else {
        chooser.choose(pair_seed(key), cells, size, mi);
      }
      std::copy(mi, mi + cells, mj);
    }
  });
}

void draw_plan(
    const at::Tensor& labels,
    const PlanArgs& a,
    at::Tensor& partner,
    at::Tensor& mask,
    at::Tensor& error) {
  std::vector<int64_t> leaders;
  int64_t* p = partner.data_ptr<int64_t>();
  const int64_t first_error = labels.scalar_type() == at::kInt
      ? pair_samples(labels.data_ptr<int32_t>(), a, p, &leaders)
      : pair_samples(labels.data_ptr<int64_t>(), a, p, &leaders);
  choose_cells(a, leaders, p, mask.data_ptr<bool>());
  error.fill_(first_error);
}

template <typename Fn>
void dispatch_unit(int64_t unit, void* data, Fn&& fn) {
  switch (unit) {
    case 1:
      return fn(static_cast<uint8_t*>(data));
    case 2:
      return fn(static_cast<uint16_t*>(data));
    case 4:
      return fn(static_cast<uint32_t*>(data));
    default:
      return fn(static_cast<uint64_t*>(data));
  }
}

PlanTensors make_plan_cpu(
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
  PlanTensors plan = empty_plan(labels, grid_h, grid_w);
  auto& [partner, mask, error] = plan;
  draw_plan(labels, a, partner, mask, error);
  return plan;
}

PlanTensors swap_cpu(
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
      x, labels, keys, pair_size, size, threshold, patch_h, patch_w, pairing, region, kMaxUnitBytes);
  PlanTensors plan = empty_plan(labels, s.plan.grid_h, s.plan.grid_w);
  auto& [partner, mask, error] = plan;
  draw_plan(labels, s.plan, partner, mask, error);
  if (s.unit != 0) {
    const int64_t* p = partner.data_ptr<int64_t>();
    const bool* m = mask.data_ptr<bool>();
    dispatch_unit(s.unit, x.data_ptr(), [&](auto* data) {
      swap_cells(data, p, m, s.plan.n, s.layout);
    });
  }
  return plan;
}

void apply_plan_cpu(
    at::Tensor& x,
    const at::Tensor& partner,
    const at::Tensor& mask,
    int64_t patch_h,
    int64_t patch_w) {
  SwapLayout l;
  const int64_t unit =
      plan_layout(x, partner, mask, patch_h, patch_w, kMaxUnitBytes, &l);
  if (unit == 0) {
    return;
  }
  dispatch_unit(unit, x.data_ptr(), [&](auto* data) {
    swap_cells(data, partner.data_ptr<int64_t>(), mask.data_ptr<bool>(), x.size(0), l);
  });
}

} // namespace
} // namespace ipsd

TORCH_LIBRARY_IMPL(ipsd_cuda, CPU, m) {
  m.impl("apply_plan_", &ipsd::apply_plan_cpu);
  m.impl("make_plan", &ipsd::make_plan_cpu);
  m.impl("swap_", &ipsd::swap_cpu);
}
