# The only file that touches omp.h. Without OpenMP (a compiler that lacks it, or
# RWKVX_NO_OPENMP=1 at build time) the stubs make every prange a plain serial loop.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define RWKVX_OPENMP 1
    #else
    #define RWKVX_OPENMP 0
    #define omp_get_max_threads() 1
    #endif
    """
    bint RWKVX_OPENMP
    int omp_get_max_threads() noexcept nogil
