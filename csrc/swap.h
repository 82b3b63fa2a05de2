// Host-side pieces shared by the CPU and CUDA kernels of ipsd_cuda::apply_plan_.
#pragma once

#include <ATen/core/Tensor.h>

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

} // namespace ipsd
