"""The thread policy, visible from Python."""
cimport rwkvx._omp as _omp

from rwkvx.errors import RwkvxError


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
    if not _omp.RWKVX_OPENMP:
        return 1
    if n_threads is None:
        return max(1, _omp.omp_get_max_threads())
    return n_threads
