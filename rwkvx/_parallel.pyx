"""The thread policy, visible from Python."""
import os

cimport rwkvx._omp as _omp

from rwkvx.errors import RwkvxError

# More threads than cores only make each barrier wait for the scheduler; far more can
# exhaust the OpenMP runtime, which then aborts the process.
THREADS_PER_CORE_LIMIT = 4


def max_threads() -> int:
    """The largest thread count accepted: THREADS_PER_CORE_LIMIT per core."""
    return THREADS_PER_CORE_LIMIT * (os.cpu_count() or 1)


def openmp_enabled() -> bool:
    """True when the extensions were compiled with OpenMP (prange loops run in parallel)."""
    return _omp.RWKVX_OPENMP


def effective_n_threads(n_threads=None) -> int:
    """The number of threads kernels will use.

    None follows OpenMP's own default, which honours OMP_NUM_THREADS (else one thread
    per core). An explicit count must be a positive int. Without OpenMP it is always 1.
    """
    if n_threads is not None:
        if isinstance(n_threads, bool) or not isinstance(n_threads, int):
            raise RwkvxError(f"threads: expected a positive int or None, got {n_threads!r}")
        if n_threads < 1:
            raise RwkvxError(f"threads: expected a positive int, got {n_threads}")
        if n_threads > max_threads():
            raise RwkvxError(f"threads: expected at most {max_threads()} ({THREADS_PER_CORE_LIMIT} per core "
                             f"on this machine), got {n_threads}")
    if not _omp.RWKVX_OPENMP:
        return 1
    if n_threads is None:
        return min(max(1, _omp.omp_get_max_threads()), max_threads())
    return n_threads
