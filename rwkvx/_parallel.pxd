# Every kernel entry point asks team_size how many threads to run with (see _parallel.pyx).
cdef int team_size(int n_threads) noexcept nogil
