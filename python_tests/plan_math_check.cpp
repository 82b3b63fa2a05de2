// Host check of csrc/plan_common.h: the counting forms the CUDA kernels use
// (SampleScan fed one sample at a time; a cell's rank counted over the
// pair's cells) and the CPU kernel's (sorting the samples; CellChooser's
// histogram) give the same plan as plain sorting:
// the same partners, positions, leaders, pair numbers and chosen cells, with
// ties in the keys included. Compiled and run by test_cell_math.py, so
// machines without a GPU test the GPU's decision logic.
//
//   plan_math_check CASES SEED    random batches; prints "ok CASES batches"
//   plan_math_check mix X...      prints mix31(X) for each X, for the fallback
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "../csrc/plan_common.h"

namespace {

struct Pairing {
  std::vector<int64_t> partner, position, pair_of;  // pair_of: -1 unless leader
};

// The CPU kernel's way: sort by (label, key, index), pair neighbours.
Pairing by_sorting(const std::vector<int32_t>& labels, const std::vector<int64_t>& keys) {
  const int64_t n = static_cast<int64_t>(labels.size());
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return ipsd::sample_before(labels[a], keys[a], a, labels[b], keys[b], b);
  });
  Pairing p{std::vector<int64_t>(n, -1), std::vector<int64_t>(n), std::vector<int64_t>(n, -1)};
  int64_t pairs = 0;
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin + 1;
    while (end < n && labels[order[end]] == labels[order[begin]]) {
      ++end;
    }
    for (int64_t r = begin; r < end; ++r) {
      p.position[order[r]] = r;
    }
    for (int64_t r = begin; r + 1 < end; r += 2) {
      p.partner[order[r]] = order[r + 1];
      p.partner[order[r + 1]] = order[r];
      p.pair_of[order[r]] = pairs++;
    }
    begin = end;
  }
  return p;
}

// The CUDA kernels' way: each sample scans the batch; a leader numbers its
// pair by counting the leaders at earlier positions.
Pairing by_counting(const std::vector<int32_t>& labels, const std::vector<int64_t>& keys,
                    std::mt19937_64& rng) {
  const int64_t n = static_cast<int64_t>(labels.size());
  Pairing p{std::vector<int64_t>(n), std::vector<int64_t>(n), std::vector<int64_t>(n, -1)};
  std::vector<uint8_t> leads_at(n, 0);
  std::vector<int64_t> visit(n);
  std::iota(visit.begin(), visit.end(), int64_t{0});
  for (int64_t i = 0; i < n; ++i) {
    // The kernel's tiles visit the batch in index order; any order must do.
    std::shuffle(visit.begin(), visit.end(), rng);
    ipsd::SampleScan<int32_t> scan(labels[i], keys[i], i);
    for (int64_t j : visit) {
      scan.visit(labels[j], keys[j], j);
    }
    p.partner[i] = scan.partner();
    p.position[i] = scan.position();
    leads_at[scan.position()] = scan.leads();
  }
  for (int64_t i = 0; i < n; ++i) {
    if (leads_at[p.position[i]]) {
      p.pair_of[i] = std::accumulate(leads_at.begin(), leads_at.begin() + p.position[i], int64_t{0});
    }
  }
  return p;
}

// By definition: nth_element over the pair's cell orders.
std::vector<bool> cells_by_selection(uint32_t seed, int64_t cells, int64_t k) {
  std::vector<bool> chosen(cells, k >= cells);
  if (k <= 0 || k >= cells) {
    return chosen;
  }
  std::vector<uint64_t> order(cells);
  for (int64_t c = 0; c < cells; ++c) {
    order[c] = ipsd::cell_order(seed, c);
  }
  std::vector<uint64_t> selected = order;
  std::nth_element(selected.begin(), selected.begin() + (k - 1), selected.end());
  for (int64_t c = 0; c < cells; ++c) {
    chosen[c] = order[c] <= selected[k - 1];
  }
  return chosen;
}

// The CPU kernel's way.
std::vector<bool> cells_by_histogram(uint32_t seed, int64_t cells, int64_t k) {
  if (k <= 0 || k >= cells) {
    return std::vector<bool>(cells, k >= cells);
  }
  bool* chosen = new bool[cells]();
  ipsd::CellChooser().choose(seed, cells, k, chosen);
  std::vector<bool> out(chosen, chosen + cells);
  delete[] chosen;
  return out;
}

// The CUDA kernel's way: a cell is chosen when fewer than k cells come first;
// 32 lanes count a strided share each.
std::vector<bool> cells_by_rank(uint32_t seed, int64_t cells, int64_t k) {
  std::vector<bool> chosen(cells);
  for (int64_t c = 0; c < cells; ++c) {
    const uint64_t mine = ipsd::cell_order(seed, c);
    int ahead = 0;
    for (int lane = 0; lane < 32; ++lane) {
      for (int64_t other = lane; other < cells; other += 32) {
        ahead += ipsd::cell_order(seed, other) < mine;
      }
    }
    chosen[c] = ahead < k;
  }
  return chosen;
}

// A box by its definition, in long double arithmetic: sides scale * grid
// rounded half up, clamped to [1, grid]; a column (else a row) off a box that
// would cover a grid of 2 or more cells; the position from the keys of cells
// 0 and 1, scaled to the places where the box fits.
bool box_is_as_defined(uint32_t seed, int64_t scale, int64_t gh, int64_t gw) {
  const ipsd::CellRect box = ipsd::pair_box(seed, scale, gh, gw);
  const long double s = std::clamp<long double>(scale, 0, ipsd::kScaleOne) / ipsd::kScaleOne;
  auto side = [&](int64_t grid) {
    return std::clamp<int64_t>(static_cast<int64_t>(std::floor(s * grid + 0.5L)), 1, grid);
  };
  int64_t rows = side(gh);
  int64_t cols = side(gw);
  if (rows == gh && cols == gw) {
    (gw >= 2 ? cols : rows) -= 1;
  }
  auto offset = [](uint32_t key, int64_t places) {
    return static_cast<int64_t>(std::floor(static_cast<long double>(key) / (1u << 31) * places));
  };
  const bool inside = box.top >= 0 && box.left >= 0 && box.top + box.rows <= gh && box.left + box.cols <= gw;
  const bool partial = gh * gw < 2 ? box.rows * box.cols == 0 : box.rows * box.cols < gh * gw;
  return inside && partial && box.rows == rows && box.cols == cols &&
      box.top == offset(ipsd::cell_key(seed, 0), gh - rows + 1) &&
      box.left == offset(ipsd::cell_key(seed, 1), gw - cols + 1);
}

int fail(const char* what, int c) {
  std::printf("case %d: %s differ\n", c, what);
  return 1;
}

} // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "mix") == 0) {
    for (int a = 2; a < argc; ++a) {
      std::printf("%u\n", ipsd::mix31(static_cast<uint32_t>(std::strtoul(argv[a], nullptr, 10))));
    }
    return 0;
  }
  const int cases = argc > 1 ? std::atoi(argv[1]) : 1000;
  std::mt19937_64 rng(argc > 2 ? std::atoll(argv[2]) : 0);
  auto draw = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int c = 0; c < cases; ++c) {
    const int64_t n = draw(0, 70);
    const int64_t classes = draw(1, std::max<int64_t>(1, n));
    // Few distinct keys make ties, which the index must break.
    const int64_t key_range = draw(0, 1) ? 3 : (int64_t{1} << 62) - 1;
    std::vector<int32_t> labels(n);
    std::vector<int64_t> keys(n);
    for (int64_t i = 0; i < n; ++i) {
      labels[i] = static_cast<int32_t>(draw(-2, classes - 3));
      keys[i] = draw(0, key_range);
    }
    const Pairing want = by_sorting(labels, keys);
    const Pairing got = by_counting(labels, keys, rng);
    if (got.partner != want.partner) {
      return fail("partners", c);
    }
    if (got.position != want.position) {
      return fail("positions", c);
    }
    if (got.pair_of != want.pair_of) {
      return fail("pair numbers", c);
    }
    const int64_t cells = draw(0, 1) ? draw(0, 12) : draw(13, 300);
    const int64_t k = draw(-1, cells + 1);
    const uint32_t seed = static_cast<uint32_t>(draw(0, ipsd::kHalfMask));
    const std::vector<bool> chosen = cells_by_selection(seed, cells, k);
    if (cells_by_rank(seed, cells, k) != chosen) {
      return fail("chosen cells (counting)", c);
    }
    if (cells_by_histogram(seed, cells, k) != chosen) {
      return fail("chosen cells (histogram)", c);
    }
    if (std::count(chosen.begin(), chosen.end(), true) != std::clamp<int64_t>(k, 0, cells)) {
      return fail("cell counts", c);
    }
    const int64_t gh = draw(1, 40);
    const int64_t gw = draw(1, 40);
    const int64_t scale = draw(0, 3) == 0 ? draw(-5, 5) + (draw(0, 1) ? ipsd::kScaleOne : 0)
                                           : draw(0, ipsd::kScaleOne);
    if (!box_is_as_defined(seed, scale, gh, gw)) {
      return fail("boxes", c);
    }
    // Large grids, where the histogram's buckets hold many keys: no counting.
    if (c % 50 == 0) {
      const int64_t big = draw(60000, 140000);
      const int64_t big_k = draw(1, big - 1);
      if (cells_by_histogram(seed, big, big_k) != cells_by_selection(seed, big, big_k)) {
        return fail("chosen cells (histogram, large grid)", c);
      }
    }
  }
  std::printf("ok %d batches\n", cases);
  return 0;
}
