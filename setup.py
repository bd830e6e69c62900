"""Build of the C++ extension ``lightning_weightlight._C``; the metadata lives in pyproject.toml."""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CSRC = os.path.join("lightning_weightlight", "csrc")

# The kernels pick AVX-512 VNNI, AVX2 or scalar code at run time through function target
# attributes, so the library itself is built for the baseline x86-64 instruction set.
# -ffp-contract=off keeps GCC from fusing a multiply and an add into one FMA where the FMA
# instruction set is enabled: the int8 epilogues then round as the scalar code and the
# reference do, on every instruction set. The kernels' own FMAs are explicit intrinsics.
extra_compile_args = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]

setup(
    ext_modules=[
        CppExtension(
            name="lightning_weightlight._C",
            sources=sorted(glob.glob(os.path.join(CSRC, "*.cpp"))),
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
