"""Build the Cython extensions, with OpenMP where the compiler has it.

Environment switches:
  RWKVX_NO_OPENMP=1       build serial kernels without probing for OpenMP
  RWKVX_REQUIRE_OPENMP=1  fail the build instead of falling back to serial kernels
  RWKVX_CYTHON_DEBUG=1    bounds checks on (slow; for hunting memory errors)
  RWKVX_ANNOTATE=1        write Cython's annotated HTML next to each .pyx
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MOD_NAMES = ["rwkvx.kernels." + name for name in ("_parallel", "_matvec", "_layer", "_wkv", "_group", "_step")]

COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": os.environ.get("RWKVX_CYTHON_DEBUG") == "1",
    "wraparound": False,
    "initializedcheck": False,
    "nonecheck": False,
    "cdivision": True,
    "embedsignature": True,
}

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def _flag_on(name):
    return os.environ.get(name, "") not in ("", "0")


class BuildExt(build_ext):
    """Chooses flags once the compiler is known (it is only after finalize_options)."""

    def run(self):
        super().run()
        if not self.inplace:
            # Also put the compiled modules beside the sources: a user who runs
            # `python -m rwkvx.run` from the checkout imports the rwkvx/ folder there, not
            # the installed copy, and it must work too. (The files are git-ignored.)
            try:
                self.copy_extensions_to_source()
            except OSError as e:
                print(f"WARNING: could not copy the extensions into the source tree: {e}", file=sys.stderr)

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        # -O3 for the vector loops; never -ffast-math: the WKV max trick relies on infinities.
        # No contraction of a * b + c into FMAs at the compiler's whim: a bf16 matrix and its
        # float32 twin must be summed by exactly the same operations (_simd.h).
        # -fno-trapping-math: floating-point exceptions are never enabled here, and without
        # it GCC keeps the comparisons of the exponential's loops as branches, so they do
        # not vectorise (_elementwise.h); no result changes.
        compile_args = ["/O2"] if msvc else ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
        link_args = []
        openmp = self._openmp_flags(msvc)
        if openmp:
            compile_args += openmp[0]
            link_args += openmp[1]
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
        super().build_extensions()

    def _openmp_flags(self, msvc):
        if _flag_on("RWKVX_NO_OPENMP"):
            return None
        flags = (["/openmp"], []) if msvc else (["-fopenmp"], ["-fopenmp"])
        if self._probe(*flags):
            return flags
        message = "the C compiler has no working OpenMP: rwkvx will run on one thread"
        if _flag_on("RWKVX_REQUIRE_OPENMP"):
            sys.exit(f"error: {message} (RWKVX_REQUIRE_OPENMP is set)")
        warnings.warn(message)
        print(f"WARNING: {message}", file=sys.stderr)
        return None

    def _probe(self, compile_args, link_args):
        tmp = tempfile.mkdtemp(prefix="rwkvx-openmp-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(OPENMP_PROBE)
            objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=compile_args)
            exe = os.path.join(tmp, "probe")
            self.compiler.link_executable(objects, exe, extra_postargs=link_args)
            subprocess.run([exe], check=True, capture_output=True)
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


extensions = [
    Extension(name, [name.replace(".", "/") + ".pyx"], include_dirs=["rwkvx/kernels"])
    for name in MOD_NAMES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=COMPILER_DIRECTIVES,
        annotate=_flag_on("RWKVX_ANNOTATE"),
    ),
    cmdclass={"build_ext": BuildExt},
)
