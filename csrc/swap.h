// Host-side pieces shared by the CPU and CUDA kernels of the ipsd_cuda ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "plan_common.h"
#include "swap_common.h"

namespace ipsd {

// Checks the arguments of apply_plan_ (raising ValueError/TypeError in Python
// before anything is written) and describes `x` as a SwapLayout whose unit is
// the widest power of two, at most `max_unit_bytes`, that divides every run
// and the data pointer. Returns the unit size in bytes; 0 when there is
// nothing to move (an empty tensor).
int64_t plan_layout(
    const at::Tensor& x,
    const at::Tensor& partner,
    const at::Tensor& mask,
    int64_t patch_h,
    int64_t patch_w,
    int64_t max_unit_bytes,
    SwapLayout* layout);

// What the plan kernels read, checked by check_plan_args.
struct PlanArgs {
  int64_t n;          // samples
  int64_t grid_h;
  int64_t grid_w;
  int64_t cells;      // grid_h * grid_w
  // The size of an active pair's region, unless pair_size is given: "cells",
  // the number of cells; "box", the scale of its sides (kScaleOne = 1).
  int64_t size;
  int64_t threshold;  // a pair is active when its draw is below it
  int64_t pairing;    // a Pairing
  int64_t region;     // a Region
  const int64_t* keys;
  const int64_t* pair_size;  // the size per pair (N / 2), or nullptr

  IPSD_HOST_DEVICE bool halves() const {
    return pairing == kPairHalves;
  }

  // The size of pair s's region.
  IPSD_HOST_DEVICE int64_t size_of(int64_t s) const {
    return pair_size != nullptr ? pair_size[s] : size;
  }
};

// Checks the arguments of the plan and swap_ ops (before anything is
// written) and collects them for the kernels. `device` is where every tensor
// must be.
PlanArgs check_plan_args(
    const at::Tensor& labels,
    const at::Tensor& keys,
    const std::optional<at::Tensor>& pair_size,
    int64_t size,
    int64_t threshold,
    int64_t grid_h,
    int64_t grid_w,
    int64_t pairing,
    int64_t region,
    const c10::Device& device);

// What the swap_ op's kernels need, checked by check_swap_args: the plan's
// arguments, x's grid, and x as a layout with its unit (0: nothing to move).
struct SwapArgs {
  PlanArgs plan;
  SwapLayout layout;
  int64_t unit;
};

// Checks the arguments of the swap_ op (x as for plan_layout, labels with one
// label per sample, the rest as for check_plan_args) before anything is
// written.
SwapArgs check_swap_args(
    const at::Tensor& x,
    const at::Tensor& labels,
    const at::Tensor& keys,
    const std::optional<at::Tensor>& pair_size,
    int64_t size,
    int64_t threshold,
    int64_t patch_h,
    int64_t patch_w,
    int64_t pairing,
    int64_t region,
    int64_t max_unit_bytes);

// Checks the arguments of exchanged_pixels (mask (N, gh, gw) bool, the
// image size and the patch size whose grid it is) and describes the cells.
CellGeometry check_pixels_args(
    const at::Tensor& mask, int64_t height, int64_t width, int64_t patch_h, int64_t patch_w);

// The plan's outputs, allocated on the labels' device: partner (N,) int64,
// mask (N, gh, gw) bool, error () int64 (the first i whose labels differ from
// labels[i + N/2] under pairing="halves", else -1).
using PlanTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
PlanTensors empty_plan(const at::Tensor& labels, int64_t grid_h, int64_t grid_w);

} // namespace ipsd
