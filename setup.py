"""Build of the optional compiled extension rdp_core._C (C++17, pybind11, OpenMP).

Everything else lives in pyproject.toml. The extension never sees torch: it takes float32 numpy views
(contiguous, or strided where a kernel reads views in place, as attention does) and sizes, and rdp_core.ops
wraps it. If it cannot be compiled the install still succeeds and
rdp_core falls back to its torch reference ops (it warns once at the first CPU op that would have used it).
"""
import glob
import os
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(compiler, flag):
    """True when the C++ compiler compiles and links a trivial OpenMP-free file with `flag`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=[flag])
        except Exception:  # distutils raises several unrelated types here
            return False
    return True


class BuildExtWithOpenMP(build_ext):
    """Adds OpenMP where the compiler supports it; without it the kernels run single-threaded."""

    def build_extensions(self):
        flag = "/openmp" if self.compiler.compiler_type == "msvc" else "-fopenmp"
        if _compiler_accepts(self.compiler, flag):
            for ext in self.extensions:
                ext.extra_compile_args.append(flag)
                if flag != "/openmp":
                    ext.extra_link_args.append(flag)
        else:
            print("rdp_core: compiler has no OpenMP; rdp_core._C will be single-threaded", file=sys.stderr)
        super().build_extensions()


ext = Pybind11Extension(
    "rdp_core._C",
    sorted(glob.glob("csrc/*.cpp")),
    depends=sorted(glob.glob("csrc/*.h")),  # a changed header rebuilds the sources
    cxx_std=17,
    # Portable baseline code only (no -march=native): a wheel built here must run on any x86-64.
    # -fno-trapping-math and -fno-math-errno change no result (we never read FP exception flags or errno);
    # they let GCC if-convert and vectorize the kernels' clamps and inline sqrt. -fno-wrapv undoes the
    # -fwrapv of Python's own CFLAGS, which made the GroupNorm+SiLU kernel 1.7x slower (no code here
    # relies on signed overflow wrapping).
    extra_compile_args=["-O3", "-fno-trapping-math", "-fno-math-errno", "-fno-wrapv"]
    if sys.platform != "win32" else ["/O2"],
    optional=True,  # a failed compile is a warning and the torch fallback is used
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtWithOpenMP})
