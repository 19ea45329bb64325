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
    use_cuda = bool(cu) and torch.cuda.is_available() or (
        bool(cu) and cpp_extension.CUDA_HOME is not None and os.environ.get("FASTCOUNT_FORCE_CUDA") == "1"
    )
    extra = {"cxx": ["-O3", "-fopenmp", "-std=c++17"]}
    kwargs = dict(
        name="fastcount._C",
        sources=cpp,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
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
