/* Large scratch buffers on huge pages where the OS offers them.
 *
 * A physically contiguous 2 MiB page maps a buffer onto the L2 cache's sets evenly; on
 * 4 KiB pages, which lines meet in one set is chance, and a product whose inputs should
 * stay in L2 (see _matmul) slows down when too many do. Measured on the 430M shape,
 * 2 threads, 256-token float32 prompt, three runs each: 280-296 tokens/s with the
 * scratch on 4 KiB pages, 316-323 on huge pages. */
#ifndef RWKVX_ALLOC_H
#define RWKVX_ALLOC_H

#include <stdlib.h>
#if defined(_WIN32)
#include <malloc.h>
#else
#include <sys/mman.h>
#endif

#define RWKVX_HUGE_PAGE ((size_t)1 << 21)

static inline void *rwkvx_alloc_huge(size_t size)
{
#if defined(_WIN32)
    return _aligned_malloc(size, RWKVX_HUGE_PAGE);
#else
    void *p = NULL;
    if (posix_memalign(&p, RWKVX_HUGE_PAGE, size) != 0)
        return NULL;
#if defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE); /* advice only: failure leaves 4 KiB pages */
#endif
    return p;
#endif
}

static inline void rwkvx_free_huge(void *p)
{
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

#endif /* RWKVX_ALLOC_H */
