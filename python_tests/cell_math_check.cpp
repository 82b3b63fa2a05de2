// Host check of csrc/swap_common.h: for random layouts, the units the CUDA
// kernel visits in a cell (cell_unit_offset, k = 0, 1, ...) are exactly the
// cell's runs (run_offset + position in the run), in the same order; the
// cells of a sample tile it exactly once; and a span of adjacent cells
// (cell_span, what the CPU kernel walks) covers exactly those cells' runs.
// Compiled and run by test_cell_math.py, so machines without a GPU test the
// GPU's arithmetic.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../csrc/swap_common.h"

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 2000;
  std::mt19937_64 rng(argc > 2 ? std::atoll(argv[2]) : 0);
  auto draw = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int c = 0; c < cases; ++c) {
    ipsd::SwapLayout l;
    l.planes = draw(1, 4);
    l.rows = draw(1, 13);
    l.row_units = draw(1, 40);
    l.cell_rows = draw(1, 15);
    l.cell_units = draw(1, l.row_units);
    l.grid_w = (l.row_units + l.cell_units - 1) / l.cell_units;
    l.cells = ((l.rows + l.cell_rows - 1) / l.cell_rows) * l.grid_w;
    std::vector<int> seen(l.sample_units(), 0);
    for (int64_t cell = 0; cell < l.cells; ++cell) {
      const ipsd::CellBox box = ipsd::cell_box(l, cell);
      std::vector<int64_t> runs;
      for (int64_t plane = 0; plane < l.planes; ++plane) {
        for (int64_t row = 0; row < box.row_count; ++row) {
          for (int64_t u = 0; u < box.unit_count; ++u) {
            runs.push_back(ipsd::run_offset<int64_t>(l, box, plane, row) + u);
          }
        }
      }
      if (static_cast<int64_t>(runs.size()) != box.units(l.planes)) {
        std::printf("case %d cell %lld: %zu units walked, %lld counted\n", c,
                    (long long)cell, runs.size(), (long long)box.units(l.planes));
        return 1;
      }
      for (int64_t k = 0; k < box.units(l.planes); ++k) {
        const int32_t off32 = ipsd::cell_unit_offset<int32_t>(l, box, static_cast<int32_t>(k));
        const int64_t off64 = ipsd::cell_unit_offset<int64_t>(l, box, k);
        if (off32 != runs[k] || off64 != runs[k]) {
          std::printf("case %d cell %lld unit %lld: CUDA order %lld/%d, CPU order %lld\n", c,
                      (long long)cell, (long long)k, (long long)off64, off32, (long long)runs[k]);
          return 1;
        }
        if (runs[k] < 0 || runs[k] >= l.sample_units()) {
          std::printf("case %d cell %lld: unit %lld outside the sample\n", c, (long long)cell,
                      (long long)runs[k]);
          return 1;
        }
        ++seen[runs[k]];
      }
    }
    const int64_t grid_h = l.cells / l.grid_w;
    for (int64_t r = 0; r < grid_h; ++r) {
      const int64_t begin = draw(0, l.grid_w - 1);
      const int64_t end = draw(begin + 1, l.grid_w);
      const ipsd::CellBox span = ipsd::cell_span(l, r, begin, end);
      for (int64_t plane = 0; plane < l.planes; ++plane) {
        for (int64_t row = 0; row < span.row_count; ++row) {
          int64_t expected = ipsd::run_offset<int64_t>(l, span, plane, row);
          for (int64_t col = begin; col < end; ++col) {
            const ipsd::CellBox box = ipsd::cell_box(l, r * l.grid_w + col);
            if (box.row0 != span.row0 || box.row_count != span.row_count ||
                ipsd::run_offset<int64_t>(l, box, plane, row) != expected) {
              std::printf("case %d: span [%lld, %lld) of grid row %lld breaks at cell %lld\n", c,
                          (long long)begin, (long long)end, (long long)r, (long long)col);
              return 1;
            }
            expected += box.unit_count;
          }
          if (expected != ipsd::run_offset<int64_t>(l, span, plane, row) + span.unit_count) {
            std::printf("case %d: span [%lld, %lld) has the wrong length\n", c, (long long)begin,
                        (long long)end);
            return 1;
          }
        }
      }
    }
    for (int64_t u = 0; u < l.sample_units(); ++u) {
      if (seen[u] != 1) {
        std::printf("case %d: unit %lld covered %d times\n", c, (long long)u, seen[u]);
        return 1;
      }
    }
  }
  std::printf("ok %d layouts\n", cases);
  return 0;
}
