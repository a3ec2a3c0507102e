# How many threads a kernel runs with (see _parallel.pyx); every entry point asks kernel_threads.
cdef int team_size(int n_threads) noexcept nogil
# team_size after checking n_threads >= 1 (RwkvxError otherwise)
cdef int kernel_threads(int n_threads) except -1
