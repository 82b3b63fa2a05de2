// CPU kernels of the ipsd_cuda ops, for data-loader workers and CPU
// training. The plan sorts the samples and selects each pair's cells
// (plan_common.h defines the orders); applying it is parallel over pairs
// (or (pair, grid row) for runs of cells), each pair moved by its lower
// member; the fused swap of a box plan exchanges the boxes it drew.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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

// Where the runs of adjacent exchanged cells average fewer bytes than this,
// apply swaps by selection over whole planes, else run by run. Measured on
// 256x3x32x32 batches: 4-byte runs (uint8, 4-pixel cells) cost several
// copies of the batch run by run, about two by selection; from 16 bytes
// (float32 at 4 pixels, float16 at 8) runs were faster than selection
// (0.6-0.8 against 1.0 copies for float32). The average, not the cell width,
// decides, so a box plan of pixel cells (one long run per row) goes by runs.
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

// Draws the plan into partner, mask and error; returns each pair's leading
// sample, in pair order (-1 for a pair left unpaired).
std::vector<int64_t> draw_plan(
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
  return leaders;
}

// A pair of the "box" region and the box it exchanges.
struct PairBox {
  int64_t first;
  int64_t second;
  CellRect box;
};

// The non-empty boxes of a "box" plan's active pairs, as choose_cells drew them.
std::vector<PairBox> pair_boxes(const PlanArgs& a, const std::vector<int64_t>& leaders, const int64_t* partner) {
  std::vector<PairBox> boxes;
  if (a.cells == 0) {
    return boxes;
  }
  for (int64_t s = 0; s < static_cast<int64_t>(leaders.size()); ++s) {
    const int64_t key = a.keys[a.n + s];
    const int64_t size = a.size_of(s);
    if (leaders[s] < 0 || !pair_active(key, a.threshold) || size <= 0) {
      continue;
    }
    const CellRect box = pair_box(pair_seed(key), size, a.grid_h, a.grid_w);
    if (box.rows * box.cols > 0) {
      boxes.push_back(PairBox{leaders[s], partner[leaders[s]], box});
    }
  }
  return boxes;
}

// Swap two non-overlapping runs of at most kShortRunBytes bytes with no
// loop: the first and last `width` bytes of each (which overlap when the run
// is shorter than two widths) cover it, and every load comes before any
// store, so an overlapped byte is written the same value twice. The
// vectorised loop of swap_run spends most of a short run in its scalar tail.
constexpr int64_t kShortRunBytes = 64;

template <size_t width>
inline void swap_ends(unsigned char* a, unsigned char* b, size_t bytes) {
  unsigned char a_head[width], a_tail[width], b_head[width], b_tail[width];
  std::memcpy(a_head, a, width);
  std::memcpy(a_tail, a + bytes - width, width);
  std::memcpy(b_head, b, width);
  std::memcpy(b_tail, b + bytes - width, width);
  std::memcpy(a, b_head, width);
  std::memcpy(a + bytes - width, b_tail, width);
  std::memcpy(b, a_head, width);
  std::memcpy(b + bytes - width, a_tail, width);
}

inline void swap_short(void* x, void* y, size_t bytes) {
  auto* a = static_cast<unsigned char*>(x);
  auto* b = static_cast<unsigned char*>(y);
  if (bytes >= 32) {
    swap_ends<32>(a, b, bytes);
  } else if (bytes >= 16) {
    swap_ends<16>(a, b, bytes);
  } else if (bytes >= 8) {
    swap_ends<8>(a, b, bytes);
  } else if (bytes >= 4) {
    swap_ends<4>(a, b, bytes);
  } else if (bytes >= 2) {
    swap_ends<2>(a, b, bytes);
  } else if (bytes == 1) {
    std::swap(*a, *b);
  }
}

// Exchanges each pair's box directly, one run per image row and plane: what
// swap_cells does for a box plan, without scanning the masks (at
// patch_size=1 a mask has a byte per pixel, and scanning it cost more than
// the exchange).
template <typename unit_t>
void swap_boxes(unit_t* data, const std::vector<PairBox>& boxes, const SwapLayout& l) {
  const int64_t sample = l.sample_units();
  // A task moves at least ~64 KiB when its boxes are half the image.
  const int64_t grain = std::max<int64_t>(
      1, (int64_t{1} << 16) / std::max<int64_t>(1, sample * static_cast<int64_t>(sizeof(unit_t))));
  at::parallel_for(0, static_cast<int64_t>(boxes.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const PairBox& pair = boxes[b];
      unit_t* x = data + pair.first * sample;
      unit_t* y = data + pair.second * sample;
      for (int64_t grid_row = pair.box.top; grid_row < pair.box.top + pair.box.rows; ++grid_row) {
        const CellBox band = cell_span(l, grid_row, pair.box.left, pair.box.left + pair.box.cols);
        const int64_t bytes = band.unit_count * static_cast<int64_t>(sizeof(unit_t));
        for (int64_t plane = 0; plane < l.planes; ++plane) {
          for (int64_t row = 0; row < band.row_count; ++row) {
            const int64_t off = run_offset<int64_t>(l, band, plane, row);
            if (bytes <= kShortRunBytes) {
              swap_short(x + off, y + off, static_cast<size_t>(bytes));
            } else {
              swap_run(x + off, y + off, band.unit_count);
            }
          }
        }
      }
    }
  });
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

at::Tensor exchanged_pixels_cpu(
    const at::Tensor& mask, int64_t height, int64_t width, int64_t patch_h, int64_t patch_w) {
  const CellGeometry g = check_pixels_args(mask, height, width, patch_h, patch_w);
  const int64_t n = mask.size(0);
  at::Tensor out = at::zeros({n}, mask.options().dtype(at::kLong));
  if (g.cells == 0) {
    return out;
  }
  const int64_t grid_h = g.cells / g.grid_w;
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  int64_t* pixels = out.data_ptr<int64_t>();
  // Every cell has the pixels of cell (0, 0) but those of the last row and
  // column: a flat count of the masked cells, which vectorises, corrected
  // by the counts in the last row and column.
  const int64_t full = g.pixels(0, 0);
  const int64_t last_row = g.pixels(grid_h - 1, 0);
  const int64_t last_col = g.pixels(0, g.grid_w - 1);
  const int64_t corner = g.pixels(grid_h - 1, g.grid_w - 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / g.cells);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* cells = m + i * g.cells;
      // Bytes are 0 or 1: 32-bit partial sums cannot overflow in 2^24
      // cells, and a narrow sum vectorises several times wider.
      int64_t all = 0;
      for (int64_t start = 0; start < g.cells; start += int64_t{1} << 24) {
        uint32_t part = 0;
        const int64_t stop = std::min(g.cells, start + (int64_t{1} << 24));
        for (int64_t c = start; c < stop; ++c) {
          part += cells[c];
        }
        all += part;
      }
      int64_t in_last_row = 0;
      for (int64_t col = 0; col < g.grid_w; ++col) {
        in_last_row += cells[(grid_h - 1) * g.grid_w + col];
      }
      int64_t in_last_col = 0;
      for (int64_t row = 0; row < grid_h; ++row) {
        in_last_col += cells[row * g.grid_w + g.grid_w - 1];
      }
      const int64_t in_corner = cells[g.cells - 1];
      // Inclusion-exclusion: the corner is in the last row and column both.
      pixels[i] = all * full + in_last_row * (last_row - full) + in_last_col * (last_col - full) +
          in_corner * (corner - last_row - last_col + full);
    }
  });
  return out;
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
  const std::vector<int64_t> leaders = draw_plan(labels, s.plan, partner, mask, error);
  if (s.unit != 0) {
    const int64_t* p = partner.data_ptr<int64_t>();
    const bool* m = mask.data_ptr<bool>();
    if (s.plan.region == kRegionBox) {
      const std::vector<PairBox> boxes = pair_boxes(s.plan, leaders, p);
      dispatch_unit(s.unit, x.data_ptr(), [&](auto* data) { swap_boxes(data, boxes, s.layout); });
    } else {
      dispatch_unit(s.unit, x.data_ptr(), [&](auto* data) {
        swap_cells(data, p, m, s.plan.n, s.layout);
      });
    }
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
  m.impl("exchanged_pixels", &ipsd::exchanged_pixels_cpu);
  m.impl("make_plan", &ipsd::make_plan_cpu);
  m.impl("swap_", &ipsd::swap_cpu);
}
