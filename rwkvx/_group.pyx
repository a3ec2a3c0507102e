"""Several matrix-vector products in one parallel loop, for layers whose glue is Python
(rwkvx.arch): one barrier for up to four products instead of one each, which matters most
when the cores are shared and every barrier waits for a descheduled thread."""
from libc.stdlib cimport malloc, free

from rwkvx._matvec cimport Linear, MatvecJob, _matvec_jobs
from rwkvx.errors import RwkvxError


def matvec_group(list linears, list xs, list outs, int n_threads=1):
    """outs[i] = linears[i] @ xs[i] for 1 to 4 products, each bit-identical to linears[i](xs[i]).

    linears: rwkvx._matvec.Linear; xs[i]: (n_cols,) float32 C-contiguous; outs[i]: (n_rows,).
    """
    cdef int n = len(linears), i
    if not 1 <= n <= 4 or len(xs) != n or len(outs) != n:
        raise RwkvxError(f"matvec_group: expected 1 to 4 products with as many inputs and outputs, "
                         f"got {n}, {len(xs)}, {len(outs)}")
    if n_threads < 1:
        raise RwkvxError(f"n_threads: expected >= 1, got {n_threads}")
    cdef MatvecJob jobs[4]
    cdef Linear lin
    cdef const float[::1] xv
    cdef float[::1] ov
    cdef Py_ssize_t scratch_floats = 0
    views = []
    for i in range(n):
        lin = linears[i]
        xv = xs[i]
        ov = outs[i]
        if xv.shape[0] != lin.m.n_cols or ov.shape[0] != lin.m.n_rows:
            raise RwkvxError(f"matvec_group: product {i}: W ({lin.m.n_rows}, {lin.m.n_cols}), "
                             f"x ({xv.shape[0]},), out ({ov.shape[0]},)")
        jobs[i].out = &ov[0]
        jobs[i].m = &lin.m
        jobs[i].x = &xv[0]
        scratch_floats += lin.m.n_cols
        # the views keep the buffers (and the Linear's arrays) alive during the call
        views.append((lin, xv, ov))
    cdef float* scratch = <float*>malloc(scratch_floats * sizeof(float))
    if scratch == NULL:
        raise MemoryError()
    try:
        with nogil:
            _matvec_jobs(jobs, n, scratch, n_threads)
    finally:
        free(scratch)
