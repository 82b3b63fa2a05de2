// The per-cell index arithmetic of the patch swap, written once for both
// kernels: the CPU kernel includes it as plain C++, the CUDA kernel as
// __host__ __device__ code. The CPU kernel walks runs of adjacent cells
// (cell_span, run_offset); the CUDA kernel numbers the units of one cell
// (cell_box, cell_unit_offset). python_tests/cell_math_check.cpp proves on
// the host that both cover the same units, so CPU-only machines test the
// GPU's arithmetic too.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IPSD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IPSD_HOST_DEVICE inline
#endif

namespace ipsd {

// One sample of a dense image tensor, measured in "units": a unit is the
// widest power-of-two word (1 to 16 bytes) that divides every run the swap
// touches, so a kernel moves whole words regardless of the dtype. A swap is
// pure data movement, which is why the dtype never matters, only its bytes.
//
// Both accepted memory formats reduce to the same shape. A sample is `planes`
// planes of `rows` rows of `row_units` units, stored densely in that order:
//   NCHW:          planes = C, one row = W pixels of one channel;
//   channels_last: planes = 1, one row = W pixels with their C channels
//                  interleaved.
// Inside one row, the cells of one grid row are consecutive runs of
// `cell_units` units; the last run of a row may be shorter (partial cell).
struct SwapLayout {
  int64_t planes;
  int64_t rows;       // H
  int64_t row_units;  // units in one row of one plane
  int64_t cell_rows;  // patch height
  int64_t cell_units; // units in one row of one full cell
  int64_t grid_w;     // cells per grid row
  int64_t cells;      // cells per sample, grid_h * grid_w

  IPSD_HOST_DEVICE int64_t sample_units() const {
    return planes * rows * row_units;
  }
};

// The part of a sample covered by one cell, clipped at the image border.
struct CellBox {
  int64_t row0;
  int64_t row_count;
  int64_t unit0;
  int64_t unit_count;

  // Units the cell covers in one sample, over all planes.
  IPSD_HOST_DEVICE int64_t units(int64_t planes) const {
    return planes * row_count * unit_count;
  }
};

IPSD_HOST_DEVICE int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// The cells [col_begin, col_end) of one grid row, as one box: horizontally
// adjacent cells are contiguous within each row of a plane, so their runs
// join into one.
IPSD_HOST_DEVICE CellBox cell_span(
    const SwapLayout& l, int64_t grid_row, int64_t col_begin, int64_t col_end) {
  CellBox b;
  b.row0 = grid_row * l.cell_rows;
  b.row_count = min64(l.cell_rows, l.rows - b.row0);
  b.unit0 = col_begin * l.cell_units;
  b.unit_count = min64(col_end * l.cell_units, l.row_units) - b.unit0;
  return b;
}

// Cells are numbered row-major over the (grid_h, grid_w) grid, as in the
// plan's mask.
IPSD_HOST_DEVICE CellBox cell_box(const SwapLayout& l, int64_t cell) {
  const int64_t grid_row = cell / l.grid_w;
  const int64_t grid_col = cell - grid_row * l.grid_w;
  return cell_span(l, grid_row, grid_col, grid_col + 1);
}

// Offset, within a sample, of the first unit of the cell's run in `plane`
// and in the cell's `row`-th row.
template <typename index_t>
IPSD_HOST_DEVICE index_t run_offset(
    const SwapLayout& l, const CellBox& b, index_t plane, index_t row) {
  return (plane * static_cast<index_t>(l.rows) +
          static_cast<index_t>(b.row0) + row) *
      static_cast<index_t>(l.row_units) +
      static_cast<index_t>(b.unit0);
}

// Offset, within a sample, of the k-th of the cell's `b.units(planes)` units,
// counting along a run first, so that consecutive k are consecutive in memory
// (coalesced when consecutive threads take consecutive k).
template <typename index_t>
IPSD_HOST_DEVICE index_t cell_unit_offset(
    const SwapLayout& l, const CellBox& b, index_t k) {
  const index_t run_len = static_cast<index_t>(b.unit_count);
  const index_t run = k / run_len;
  const index_t in_run = k - run * run_len;
  const index_t rows = static_cast<index_t>(b.row_count);
  const index_t plane = run / rows;
  const index_t row = run - plane * rows;
  return run_offset<index_t>(l, b, plane, row) + in_run;
}

// The pixels of the cell (row, col) of an image of `height` x `width` pixels
// cut into patches of `patch_h` x `patch_w` (the patch no larger than the
// image): a partial cell at the bottom or right edge has the pixels it
// covers. Weighs a plan's exchanged cells into its share of each image.
struct CellGeometry {
  int64_t height;
  int64_t width;
  int64_t patch_h;
  int64_t patch_w;
  int64_t grid_w;
  int64_t cells;

  IPSD_HOST_DEVICE int64_t pixels(int64_t row, int64_t col) const {
    return min64(patch_h, height - row * patch_h) * min64(patch_w, width - col * patch_w);
  }
};

// Whether sample i moves its pair: each pair is moved once, by its lower
// member, so the two members never race. A partner that is out of range or
// does not point back (a corrupted plan handed to the raw op) moves nothing,
// rather than touching memory out of bounds or racing with another pair.
IPSD_HOST_DEVICE bool leads_pair(const int64_t* partner, int64_t n, int64_t i) {
  const int64_t j = partner[i];
  return j > i && j < n && partner[j] == i;
}

// Whether sample i moves `cell` (of `cells` per sample).
IPSD_HOST_DEVICE bool moves_cell(
    const int64_t* partner,
    const bool* mask,
    int64_t n,
    int64_t cells,
    int64_t i,
    int64_t cell) {
  return mask[i * cells + cell] && leads_pair(partner, n, i);
}

} // namespace ipsd
