// fastcount._C: registers the fastcount op schemas with the dispatcher.
//
// Schemas are defined once here (TORCH_LIBRARY); each device provides its
// kernels with TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/, as torchvision
// does. Fake (meta) kernels for torch.compile live in Python (fastcount/ops.py,
// torch.library.register_fake), where symbolic shapes are handled for free.
#include <Python.h>

#include <torch/library.h>

#include "fastcount_ops.h"
#include "cpu/memory_pool.h"

TORCH_LIBRARY(fastcount, m) {
  // The Python module that registers the fake kernels: torch points users there
  // if they load this library without importing fastcount.
  m.set_python_module("fastcount.ops");
  m.def("make_targets(Tensor dots, int patch_size=32, int stride=1) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("make_targets_from_points(Tensor points, int height, int width, int patch_size=32, "
        "int stride=1) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("redundant_count(Tensor count_map, int patch_size=32, int stride=1, int cell=0) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // FFT overlap-save channel mixing (CPU only): out[p, o, f] = sum_c x[c, p, f] * k[f, c, o],
  // x (C, P, F) complex64, k packed float32 (ceil(F/16), ceil(O/4), C, 4, 2, 16) (see
  // fastcount.inference.fft.pack_spectrum), out (P, O, F) complex64.
  m.def("spectral_mix(Tensor x, Tensor k, int out_channels) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // FFT overlap-save tile gather (CPU only): NHWC x -> (C, N*ny*nx, t, t) tiles, tile (iy, ix)
  // starting at (iy*step, ix*step), zero outside the image.
  m.def("gather_tiles(Tensor x, int t, int step, int ny, int nx) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // FFT overlap-save output pass (CPU only): (P, O, t, t) irfft2 tiles -> NHWC (N, height, width, O),
  // each tile's b x b corner cropped into place with the LeakyReLU.
  // Fused 1x1 conv stack (CPU only): x (P, C) float32 pixels -> (P, O_last), each layer
  // z = leaky_relu(z @ w.T + b, slope) with every intermediate kept in cache.
  m.def("pointwise_mlp(Tensor x, Tensor[] weights, Tensor[] biases, float[] slopes) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // 3x3 conv (pad 1) + bias + LeakyReLU by Winograd F(4x4, 3x3) (CPU only): NHWC x (N, H, W, C),
  // u = G w G^T as (36, C, Opad), bias (Opad,), Opad = out_channels rounded up to 16 -> NHWC out.
  m.def("winograd_conv3x3(Tensor x, Tensor u, Tensor bias, int out_channels, float slope) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("crop_tiles(Tensor tiles, int n, int ny, int nx, int b, int height, int width, float slope) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// A plain CPython module (no pybind11): importing it runs the static
// registrations above. `with_cuda` tells Python whether CUDA kernels exist.
// The CPU memory pool (csrc/cpu/memory_pool.cpp) as plain module functions;
// fastcount.inference.memory wraps them.
namespace {

template <typename F>
PyObject* guarded(F f) {
  try {
    f();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* pool_enter(PyObject*, PyObject*) { return guarded(fastcount::pool::enter); }
PyObject* pool_exit(PyObject*, PyObject*) { return guarded(fastcount::pool::exit); }
PyObject* pool_release(PyObject*, PyObject*) { return guarded(fastcount::pool::release); }

PyObject* pool_set_limit(PyObject*, PyObject* arg) {
  const unsigned long long v = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  return guarded([v] { fastcount::pool::set_limit(static_cast<size_t>(v)); });
}

PyObject* pool_stats(PyObject*, PyObject*) {
  const fastcount::pool::Stats s = fastcount::pool::stats();
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:L,s:K}", "idle_bytes", (unsigned long long)s.idle_bytes,
                       "live_bytes", (unsigned long long)s.live_bytes, "hits", (unsigned long long)s.hits,
                       "misses", (unsigned long long)s.misses, "depth", (long long)s.depth, "limit",
                       (unsigned long long)s.limit);
}

PyMethodDef kMethods[] = {
    {"pool_enter", pool_enter, METH_NOARGS, "Open a memory-pool scope (the pool becomes the CPU allocator)."},
    {"pool_exit", pool_exit, METH_NOARGS, "Close a scope; the last one restores the allocator and trims."},
    {"pool_release", pool_release, METH_NOARGS, "Free every idle cached block."},
    {"pool_set_limit", pool_set_limit, METH_O, "Cap the idle cached bytes."},
    {"pool_stats", pool_stats, METH_NOARGS, "Pool counters as a dict."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastcount compiled ops", -1,
                                   kMethods};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
#ifdef FASTCOUNT_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(mod, "with_cuda", with_cuda) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
