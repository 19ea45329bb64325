"""Build script: the Python package plus the optional compiled ops in csrc/.

The C++ (and, when torch has CUDA, CUDA) sources in csrc/ are compiled into
``fastcount._C``. When no sources exist yet, or FASTCOUNT_NO_EXT=1, the package
installs pure-Python and falls back to the PyTorch reference implementations.
"""
import glob
import os

from setuptools import setup

PACKAGES = [
    "fastcount",
    "fastcount.inference",
    "fastcount.slide",
    "fastcount.data",
    "fastcount.kernels",
]


def extensions():
    if os.environ.get("FASTCOUNT_NO_EXT") == "1":
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # CUDA kernels are built whenever torch itself is a CUDA build and nvcc is
    # found (a GPU need not be visible at build time); FASTCOUNT_NO_CUDA=1 opts out.
    use_cuda = (
        bool(cu)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FASTCOUNT_NO_CUDA") != "1"
    )
    # No -std flag: BuildExtension picks the standard the installed torch needs
    # (C++17 or C++20, depending on the torch version).
    extra = {"cxx": ["-O3", "-fopenmp"]}
    kwargs = dict(
        name="fastcount._C",
        sources=cpp,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        # no --use_fast_math: it flushes float32 denormals, and the CUDA results
        # must match the CPU kernels bit for bit.
        extra["nvcc"] = ["-O3"]
        kwargs["sources"] = cpp + cu
        kwargs["define_macros"] = [("FASTCOUNT_WITH_CUDA", "1")]
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    package_dir={"fastcount.kernels": "kernels"},
    package_data={"fastcount": ["weights/*.safetensors"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
