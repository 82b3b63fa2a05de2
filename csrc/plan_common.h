// The decisions of a swap plan, as arithmetic on random keys, written once
// for both kernels: the CPU kernel includes it as plain C++, the CUDA kernel
// as __host__ __device__ code, and the PyTorch fallback (ipsd_cuda/plan.py)
// computes the same functions with tensor operations. Given the same keys
// every backend therefore draws the same plan, bit for bit.
//
// The keys: one int64 tensor of N + N/2 values, uniform in [0, 2^62), drawn
// in a single call.
//   keys[i], i < N:      sample i's pairing key ("random" pairing sorts the
//                        samples by (label, key, index), "any" pairing by
//                        (key, index), as if every label were the same);
//   keys[N + s], s < S:  pair s's key. Its high 31 bits decide whether the
//                        pair is active, its low 31 bits seed the pair's
//                        cell keys (cell_key below), so that drawing the plan
//                        costs O(N) random numbers, not O(N * cells). The
//                        "cells" region ranks every cell by its key; the
//                        "box" region places its box with the keys of cells
//                        0 and 1.
// Pairs are numbered by the sorted position of their first member.
//
// The CPU kernel sorts the samples and selects cells with a histogram
// (CellChooser); the CUDA kernel counts ranks, one thread per sample and one
// warp per cell. Both use the orders defined here, which are total (ties go
// to the lower index), so the results agree; python_tests/plan_math_check.cpp
// checks every form against plain sorting on the host.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "swap_common.h"

namespace ipsd {

constexpr int kHalfBits = 31;
constexpr uint32_t kHalfMask = 0x7FFFFFFFu;
// An odd step, so that cells 0..2^31-1 get distinct inputs to mix31.
constexpr uint32_t kCellStep = 0x1E3779B9u;

// The ops' `pairing` argument: which samples may pair.
enum Pairing : int64_t {
  kPairClasses = 0,  // "random": at random within each class
  kPairHalves = 1,   // "halves": i with i + N/2, when their labels agree
  kPairAny = 2,      // "any": at random over the whole batch, whatever the labels
};

// The ops' `region` argument: which cells an active pair exchanges.
enum Region : int64_t {
  kRegionCells = 0,  // "cells": k cells anywhere, k from the size argument
  kRegionBox = 1,    // "box": one rectangle of cells, its sides from the size argument
};

// A bijection of [0, 2^31): xor-shifts and odd multipliers modulo 2^31. The
// products of 31-bit values fit in int64, so the fallback computes the same
// bits with plain tensor arithmetic.
IPSD_HOST_DEVICE uint32_t mix31(uint32_t x) {
  x ^= x >> 16;
  x = (x * 0x7FEB352Du) & kHalfMask;
  x ^= x >> 15;
  x = (x * 0x2C1B3C6Du) & kHalfMask;
  x ^= x >> 16;
  x = (x * 0x3A8F05C5u) & kHalfMask;
  x ^= x >> 15;
  return x;
}

// Whether pair key `pair_key` makes its pair active: its high 31 bits fall
// below `threshold` = floor(p * 2^31).
IPSD_HOST_DEVICE bool pair_active(int64_t pair_key, int64_t threshold) {
  return (pair_key >> kHalfBits) < threshold;
}

IPSD_HOST_DEVICE uint32_t pair_seed(int64_t pair_key) {
  return static_cast<uint32_t>(pair_key) & kHalfMask;
}

// The 31-bit key of `cell` in the pair seeded by `seed`.
IPSD_HOST_DEVICE uint32_t cell_key(uint32_t seed, int64_t cell) {
  return mix31((seed + static_cast<uint32_t>(cell) * kCellStep) & kHalfMask);
}

// The order in which a pair's cells are chosen: by key, then by index (the
// keys of one pair are distinct, mix31 being a bijection, but the order is
// total regardless). A pair exchanges the k cells that come first.
IPSD_HOST_DEVICE uint64_t cell_order(uint32_t seed, int64_t cell) {
  return (static_cast<uint64_t>(cell_key(seed, cell)) << 32) | static_cast<uint32_t>(cell);
}

// Box sides are scaled by a 31-bit fixed-point factor: kScaleOne is 1.
constexpr int64_t kScaleOne = int64_t{1} << kHalfBits;

// A pair's box in the "box" region, in cells: rows [top, top + rows) and
// columns [left, left + cols) of the (grid_h, grid_w) grid.
struct CellRect {
  int64_t top;
  int64_t left;
  int64_t rows;
  int64_t cols;

  IPSD_HOST_DEVICE bool contains(int64_t row, int64_t col) const {
    return row >= top && row < top + rows && col >= left && col < left + cols;
  }
};

// One side of a box: scale * grid rounded half up, at least 1 and at most
// grid. `scale` is clamped to [0, kScaleOne] first, so that the product fits
// in int64 for any grid of at most 2^31 cells.
IPSD_HOST_DEVICE int64_t box_side(int64_t scale, int64_t grid) {
  const int64_t s = scale < 0 ? 0 : (scale > kScaleOne ? kScaleOne : scale);
  const int64_t side = (s * grid + (kScaleOne >> 1)) >> kHalfBits;
  return side < 1 ? 1 : (side > grid ? grid : side);
}

// An offset uniform in [0, range) from a 31-bit key (multiply and shift:
// the bias is at most range / 2^31).
IPSD_HOST_DEVICE int64_t scaled_offset(uint32_t key, int64_t range) {
  return (static_cast<int64_t>(key) * range) >> kHalfBits;
}

// The box of the pair seeded by `seed`, for a grid of at least one cell: its
// sides are box_side of the grid's, and a box that would cover the whole
// grid loses a column (a row when the grid is one column wide), as a pair
// in the "cells" region exchanges at most G - 1 cells; on a grid of one cell
// the box is empty. Its position is uniform over the places where it fits,
// from the keys of cells 0 and 1.
IPSD_HOST_DEVICE CellRect pair_box(uint32_t seed, int64_t scale, int64_t grid_h, int64_t grid_w) {
  CellRect box;
  box.rows = box_side(scale, grid_h);
  box.cols = box_side(scale, grid_w);
  if (box.rows == grid_h && box.cols == grid_w) {
    if (grid_w >= 2) {
      --box.cols;
    } else {
      --box.rows;
    }
  }
  box.top = scaled_offset(cell_key(seed, 0), grid_h - box.rows + 1);
  box.left = scaled_offset(cell_key(seed, 1), grid_w - box.cols + 1);
  return box;
}

// The CPU kernel's way to choose the k first cells of a pair: a histogram of
// the keys' top bits finds the bucket of the k-th key in one pass, and only
// that bucket's few keys are sorted (expected O(cells), where selecting from
// cell_order values costs several times more). The 31-bit keys of a pair are
// distinct, so the k smallest keys are exactly the k first cells.
class CellChooser {
 public:
  // Sets chosen[c] to whether c is among the k (0 < k < cells) first cells
  // of the pair seeded by `seed`.
  void choose(uint32_t seed, int64_t cells, int64_t k, bool* chosen) {
    int bits = 0;
    while (bits < 16 && (int64_t{1} << bits) < cells) {
      ++bits;
    }
    const int shift = kHalfBits - bits;
    keys_.resize(cells);
    count_.assign(size_t{1} << bits, 0);
    for (int64_t c = 0; c < cells; ++c) {
      keys_[c] = cell_key(seed, c);
      ++count_[keys_[c] >> shift];
    }
    uint32_t bucket = 0;
    int64_t before = 0;
    while (before + count_[bucket] < k) {
      before += count_[bucket++];
    }
    boundary_.clear();
    for (int64_t c = 0; c < cells; ++c) {
      const uint32_t b = keys_[c] >> shift;
      // Unpredictable half the time: a store, not a branch.
      chosen[c] = b < bucket;
      if (b == bucket) {
        boundary_.push_back((static_cast<uint64_t>(keys_[c]) << 32) | static_cast<uint32_t>(c));
      }
    }
    const auto take = boundary_.begin() + (k - before);
    std::nth_element(boundary_.begin(), take - 1, boundary_.end());
    for (auto it = boundary_.begin(); it != take; ++it) {
      chosen[static_cast<uint32_t>(*it)] = true;
    }
  }

 private:
  std::vector<uint32_t> keys_;
  std::vector<int64_t> count_;
  std::vector<uint64_t> boundary_;
};

// Whether sample a comes before sample b in the "random" pairing order (and
// in the "any" order, where every label is taken as 0).
template <typename label_t>
IPSD_HOST_DEVICE bool sample_before(
    label_t label_a, int64_t key_a, int64_t a,
    label_t label_b, int64_t key_b, int64_t b) {
  if (label_a != label_b) {
    return label_a < label_b;
  }
  return key_a < key_b || (key_a == key_b && a < b);
}

// One sample's place in the "random" pairing order, accumulated over every
// sample j (itself included) in any order: the CUDA kernel feeds it from
// shared-memory tiles, one thread per sample.
template <typename label_t>
struct SampleScan {
  label_t label;
  int64_t key;
  int64_t index;
  int64_t below = 0;    // samples of a smaller label
  int64_t rank = 0;     // samples of its label that come before it
  int64_t count = 0;    // samples of its label, itself included
  int64_t prev = -1;    // the sample of its label just before it
  int64_t prev_key = 0;
  int64_t next = -1;    // the sample of its label just after it
  int64_t next_key = 0;

  IPSD_HOST_DEVICE SampleScan(label_t l, int64_t k, int64_t i)
      : label(l), key(k), index(i) {}

  IPSD_HOST_DEVICE void visit(label_t l, int64_t k, int64_t j) {
    if (l < label) {
      ++below;
      return;
    }
    if (l != label) {
      return;
    }
    ++count;
    if (sample_before(l, k, j, label, key, index)) {
      ++rank;
      if (prev < 0 || sample_before(l, prev_key, prev, l, k, j)) {
        prev = j;
        prev_key = k;
      }
    } else if (j != index &&
               (next < 0 || sample_before(l, k, j, l, next_key, next))) {
      next = j;
      next_key = k;
    }
  }

  // Position in the order (label, key, index) over the whole batch.
  IPSD_HOST_DEVICE int64_t position() const {
    return below + rank;
  }

  // Within its class the 1st and 2nd, 3rd and 4th, ... samples pair up; the
  // first of each pair leads it.
  IPSD_HOST_DEVICE bool leads() const {
    return rank % 2 == 0 && rank + 1 < count;
  }

  IPSD_HOST_DEVICE int64_t partner() const {
    return leads() ? next : (rank % 2 == 1 ? prev : -1);
  }
};

} // namespace ipsd
