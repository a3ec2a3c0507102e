"""Several matrix products in one parallel loop, for layers whose glue is Python (rwkvx.arch):
one set of barriers for up to four products instead of one each, which matters most when
the cores are shared and every barrier waits for a descheduled thread."""
from libc.stdlib cimport malloc, free

from rwkvx.kernels._matvec cimport Linear, MatmulJob, MatvecJob, U8Sums, _matmul_jobs, _matvec_jobs, wbuf_floats
from rwkvx.kernels._parallel cimport kernel_threads  # fewer threads while other programs contend for the cores
from rwkvx.kernels._matvec import WBUF_SLOT, _product_scratch, _scratch
from rwkvx.errors import RwkvxError


def matvec_group(list linears, list xs, list outs, int n_threads=1):
    """outs[i] = linears[i] @ xs[i] for 1 to 4 products, each bit-identical to linears[i](xs[i]).

    linears: rwkvx.kernels._matvec.Linear; xs[i]: (n_cols,) float32 C-contiguous; outs[i]: (n_rows,).
    """
    cdef int n = len(linears), i
    if not 1 <= n <= 4 or len(xs) != n or len(outs) != n:
        raise RwkvxError(f"matvec_group: expected 1 to 4 products with as many inputs and outputs, "
                         f"got {n}, {len(xs)}, {len(outs)}")
    n_threads = kernel_threads(n_threads)
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


def matmul_group(list linears, list Xs, list outs, int n_threads=1):
    """outs[i] = Xs[i] @ linears[i].T for 1 to 4 products over the same n_tok rows, in one
    set of parallel loops; each result is bit-identical to linears[i].matmul(Xs[i]).

    Xs[i]: (n_tok, n_cols) float32 C-contiguous; outs[i]: (n_tok, n_rows) C-contiguous.
    """
    cdef int n = len(linears), i
    if not 1 <= n <= 4 or len(Xs) != n or len(outs) != n:
        raise RwkvxError(f"matmul_group: expected 1 to 4 products with as many inputs and outputs, "
                         f"got {n}, {len(Xs)}, {len(outs)}")
    n_threads = kernel_threads(n_threads)
    cdef MatmulJob jobs[4]
    cdef Linear lin
    cdef const float[:, ::1] xv
    cdef float[:, ::1] ov, xrv
    cdef float[::1] xpv
    cdef unsigned char[::1] sv
    cdef Py_ssize_t n_tok = -1, wide = 0
    keep = []
    for i in range(n):
        lin = linears[i]
        xv = Xs[i]
        ov = outs[i]
        if n_tok < 0:
            n_tok = xv.shape[0]
        if xv.shape[0] != n_tok or xv.shape[1] != lin.m.n_cols or ov.shape[0] != n_tok or ov.shape[1] != lin.m.n_rows:
            raise RwkvxError(f"matmul_group: product {i}: W ({lin.m.n_rows}, {lin.m.n_cols}), "
                             f"X ({xv.shape[0]}, {xv.shape[1]}), out ({ov.shape[0]}, {ov.shape[1]}); "
                             f"all products take {n_tok} rows")
        if n_tok == 0:
            return
        xr, xpack, sums = _product_scratch(i, n_tok, lin.m.n_cols)
        xrv, xpv, sv = xr, xpack, sums
        jobs[i] = MatmulJob(&ov[0, 0], lin.m.n_rows, &lin.m, &xv[0, 0], &xrv[0, 0], <U8Sums*>&sv[0], &xpv[0])
        wide = max(wide, lin.m.n_cols)
        keep.append((lin, xv, ov, xr, xpack, sums))
    wbuf = _scratch(WBUF_SLOT, n_threads * wbuf_floats(wide))
    cdef float[::1] wv = wbuf
    with nogil:
        _matmul_jobs(jobs, n, n_tok, &wv[0], n_threads)
