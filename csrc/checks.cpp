// Argument validation shared by the CPU and CUDA kernels. The rules match
// fastcount.geometry.check_patch_stride and the public wrappers in
// fastcount/ops.py, so torch.ops.fastcount.* fails the same way they do.
#include <c10/util/Exception.h>

#include <limits>

#include "fastcount_ops.h"

namespace fastcount {

namespace {
constexpr int64_t kMinPatch = 4;  // fastcount.geometry.MIN_PATCH

bool is_int_type(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong ||
         t == at::kBool;
}
bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

void check_geometry(int64_t patch_size, int64_t stride) {
  TORCH_CHECK_VALUE(patch_size >= kMinPatch, "patch_size must be >= ", kMinPatch, ", got ",
                    patch_size);
  TORCH_CHECK_VALUE(stride >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(patch_size % stride == 0,
                    "stride must divide patch_size so that the redundancy (r/s)^2 is whole; got "
                    "patch_size=",
                    patch_size, ", stride=", stride);
}

std::vector<int64_t> check_dots(const at::Tensor& dots, int64_t patch_size, int64_t stride,
                                int64_t& n_images, int64_t& height, int64_t& width) {
  check_geometry(patch_size, stride);
  TORCH_CHECK_TYPE(is_int_type(dots.scalar_type()) || is_float_type(dots.scalar_type()),
                   "dots must hold integer or float counts, got dtype ", dots.scalar_type());
  TORCH_CHECK_VALUE(dots.dim() == 2 || dots.dim() == 3,
                    "dots must be (H, W) or (B, H, W), got shape ", dots.sizes());
  height = dots.size(-2);
  width = dots.size(-1);
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "dots must have H, W >= 1, got shape ",
                    dots.sizes());
  n_images = dots.dim() == 3 ? dots.size(0) : 1;
  std::vector<int64_t> shape;
  if (dots.dim() == 3) shape.push_back(n_images);
  shape.push_back(out_side(height, patch_size, stride));
  shape.push_back(out_side(width, patch_size, stride));
  return shape;
}

bool narrow_accumulator_ok(at::ScalarType dtype, int64_t patch_size) {
  int64_t max_abs = 0;
  switch (dtype) {
    case at::kBool: max_abs = 1; break;
    case at::kByte: max_abs = 255; break;
    case at::kChar: max_abs = 128; break;
    case at::kShort: max_abs = 32768; break;
    default: return false;
  }
  // Every prefix difference the kernels form is a (partial) box sum bounded by r*r*max|v|.
  const int64_t limit = std::numeric_limits<int32_t>::max();
  return patch_size <= 46341 && patch_size * patch_size <= limit / max_abs;
}

std::vector<int64_t> check_points(const at::Tensor& points, int64_t height, int64_t width,
                                  int64_t patch_size, int64_t stride) {
  check_geometry(patch_size, stride);
  TORCH_CHECK_TYPE(points.scalar_type() == at::kLong,
                   "points must be int64 (row, col) coordinates, got dtype ",
                   points.scalar_type());
  TORCH_CHECK_VALUE(points.dim() == 2 && points.size(1) == 2,
                    "points must have shape (N, 2) as (row, col), got ", points.sizes());
  TORCH_CHECK_VALUE(height >= 1, "height must be a positive int, got ", height);
  TORCH_CHECK_VALUE(width >= 1, "width must be a positive int, got ", width);
  return {out_side(height, patch_size, stride), out_side(width, patch_size, stride)};
}

void raise_bad_point(int64_t index, int64_t row, int64_t col, int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(false, "points[", index, "] = (", row, ", ", col,
                    ") lies outside the image of shape (", height, ", ", width, ")");
}

std::vector<int64_t> check_count_map(const at::Tensor& count_map, int64_t patch_size,
                                     int64_t stride, int64_t cell, int64_t& n_maps,
                                     int64_t& height, int64_t& width) {
  check_geometry(patch_size, stride);
  const auto t = count_map.scalar_type();
  TORCH_CHECK_TYPE(t != at::kBool && (is_int_type(t) || is_float_type(t)),
                   "count_map must be a real numeric tensor, got dtype ", t);
  TORCH_CHECK_VALUE(count_map.dim() >= 2 && count_map.dim() <= 4,
                    "count_map must be (H, W), (B, H, W) or (B, 1, H, W), got shape ",
                    count_map.sizes());
  TORCH_CHECK_VALUE(cell >= 0, "cell must be a non-negative int (0 = one count per image), got ",
                    cell);
  height = count_map.size(-2);
  width = count_map.size(-1);
  n_maps = 1;
  std::vector<int64_t> shape;
  for (int64_t d = 0; d < count_map.dim() - 2; ++d) {
    n_maps *= count_map.size(d);
    shape.push_back(count_map.size(d));
  }
  if (cell > 0) {
    shape.push_back((height + cell - 1) / cell);
    shape.push_back((width + cell - 1) / cell);
  }
  return shape;
}

}  // namespace fastcount
