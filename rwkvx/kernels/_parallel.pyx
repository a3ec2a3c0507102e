"""The thread policy, visible from Python: how many threads the kernels use by default, and why."""
import math
import os

cimport rwkvx.kernels._omp as _omp

from rwkvx.errors import RwkvxError

# More threads than cores only make each barrier wait for the scheduler; far more can
# exhaust the OpenMP runtime, which then aborts the process.
THREADS_PER_CORE_LIMIT = 4

CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"

# Set by rwkvx/__init__.py once the extensions have loaded libgomp: how its threads wait.
_wait_note = "OpenMP's own wait policy"


def max_threads() -> int:
    """The largest thread count accepted: THREADS_PER_CORE_LIMIT per core."""
    return THREADS_PER_CORE_LIMIT * (os.cpu_count() or 1)


def openmp_enabled() -> bool:
    """True when the extensions were compiled with OpenMP (prange loops run in parallel)."""
    return _omp.RWKVX_OPENMP


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. from taskset or a cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        # no affinity call (macOS, Windows)
        return os.cpu_count() or 1


def _ancestors(path: str) -> list[str]:
    # "/a/b" -> ["a/b", "a", ""]: a cgroup is limited by its own quota and by every parent's
    parts = [p for p in path.split("/") if p and p != ".."]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _read_words(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def _quota_v2(directory: str) -> float | None:
    # cpu.max: "$MAX $PERIOD", $MAX "max" when unlimited
    words = _read_words(os.path.join(directory, "cpu.max"))
    if not words or words[0] == "max":
        return None
    try:
        quota, period = int(words[0]), int(words[1]) if len(words) > 1 else 100000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(directory: str) -> float | None:
    # cpu.cfs_quota_us is -1 when unlimited
    quota, period = (_read_words(os.path.join(directory, name)) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    try:
        quota_us, period_us = int(quota[0]), int(period[0])
    except (TypeError, IndexError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cgroup_cpu_limit(root: str = CGROUP_ROOT, self_cgroup: str = SELF_CGROUP) -> float | None:
    """The CPU time, in CPUs, that cgroup quotas allow this process (docker --cpus=1.5 gives
    1.5): the smallest quota of its cgroup and their parents, v2 (cpu.max) or v1
    (cpu.cfs_quota_us / cpu.cfs_period_us); None when there is none or it cannot be read.

    root is where the cgroup file systems are mounted and self_cgroup the process's
    membership list (/proc/self/cgroup); tests pass fake ones.
    """
    try:
        with open(self_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            # v2; "unified" is its mount point on hybrid systems
            mounts, read = [root, os.path.join(root, "unified")], _quota_v2
        elif "cpu" in controllers.split(","):
            names = dict.fromkeys([controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"])
            mounts = [os.path.join(root, name) for name in names]
            read = _quota_v1
        else:
            continue
        for mount in mounts:
            if not os.path.isdir(mount):
                continue
            # inside a container without its own cgroup namespace the path names the host's
            # hierarchy and does not exist here; the walk then ends at the mount, the
            # container's own cgroup
            for relative in _ancestors(path):
                directory = os.path.join(mount, relative) if relative else mount
                if os.path.isdir(directory):
                    limit = read(directory)
                    if limit is not None:
                        limits.append(limit)
    return min(limits) if limits else None


def threads_for_quota(quota: float) -> int:
    """Threads for a CPU quota: rounded to the nearest whole CPU (halves up), at least one.

    A thread beyond the quota gets the process throttled: every thread stops for the rest
    of each CFS period (100 ms by default), so tokens stall. That is worth it only when the
    extra thread brings at least half a CPU of time: 1.5 CPUs -> 2, 1.4 -> 1, 0.5 -> 1.
    """
    return max(1, math.floor(quota + 0.5))


def _omp_num_threads(text: str) -> int | None:
    # libgomp's syntax: a list of counts for nested levels; the first is ours
    first = text.split(",")[0].strip()
    try:
        value = int(first)
    except ValueError:
        return None
    return value if value >= 1 else None


def _cpus_text(quota: float) -> str:
    # 1.0, 1.5, 0.25
    text = f"{quota:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def thread_policy(root: str = CGROUP_ROOT, self_cgroup: str = SELF_CGROUP) -> tuple[int, str]:
    """(default thread count, why), e.g. (2, "2 (2 CPUs usable, no cgroup quota)") or
    (1, "1 (cgroup quota 1.0 CPU; 2 CPUs usable)").

    OMP_NUM_THREADS wins; else the CPUs this process may use: its affinity, capped by a
    cgroup CPU quota (threads_for_quota). Read on every call, so a changed affinity or
    environment counts. root and self_cgroup: see cgroup_cpu_limit.
    """
    if not _omp.RWKVX_OPENMP:
        return 1, "1 (built without OpenMP)"
    limit = max_threads()
    note = ""
    text = os.environ.get("OMP_NUM_THREADS")
    if text is not None and text.strip():
        n = _omp_num_threads(text)
        if n is not None:
            if n > limit:
                return limit, f"{limit} (OMP_NUM_THREADS={n}, capped at {THREADS_PER_CORE_LIMIT} per core)"
            return n, f"{n} (OMP_NUM_THREADS)"
        note = f"; OMP_NUM_THREADS={text!r} ignored: not a positive count"
    usable = usable_cpus()
    quota = cgroup_cpu_limit(root, self_cgroup)
    cpus = f"{usable} CPU{'s' if usable != 1 else ''} usable"
    if quota is None:
        return usable, f"{usable} ({cpus}, no cgroup quota{note})"
    from_quota = threads_for_quota(quota)
    quota_text = f"cgroup quota {_cpus_text(quota)} CPU{'s' if quota != 1 else ''}"
    if from_quota < usable:
        return from_quota, f"{from_quota} ({quota_text}; {cpus}{note})"
    return usable, f"{usable} ({cpus}, {quota_text}{note})"


def wait_policy() -> str:
    """How idle OpenMP threads wait, and who chose it (see rwkvx/__init__.py)."""
    return _wait_note


def _record_wait_policy(note: str) -> None:
    global _wait_note
    _wait_note = note


# ---- fewer threads while the cores are contended ----
#
# A kernel call's threads meet at a barrier after every parallel loop, dozens per token.
# When another program runs on one of our cores, the thread sharing it is descheduled for
# whole time slices and the others wait for it at each barrier: two threads on two cores
# next to one busy process decode slower than one thread (the issue's 171 vs 32 ms/token).
# The signal is the process's involuntary context switches (getrusage's ru_nivcsw): an
# idle machine preempts our threads a few times a second, a core shared with a busy
# process hundreds of times. While that rate is high and some other thread wants a CPU
# (/proc/loadavg's runnable count less this process's threads in state R; without that
# check an idle machine's stray preemptions now and then cut a 2-thread batch to one
# thread, 9-24% slower), team_size hands out one thread fewer per window, down to one;
# when it is quiet it tries one more, waiting twice as long after each try that brought
# the preemptions back (a single thread on a free core sees no contention, so only a try
# can tell whether a second core came free), and not while the machine's runnable
# threads leave no CPU free. Team sizes change only which thread computes which rows,
# never the results (each output element is computed by exactly one thread, in the same
# order, whatever the count).

cdef extern from *:
    """
    #if defined(__unix__) || defined(__APPLE__)
    #include <sys/resource.h>
    #include <time.h>
    static long rwkvx_preemptions(void) {
        struct rusage ru;
        return getrusage(RUSAGE_SELF, &ru) == 0 ? (long)ru.ru_nivcsw : -1;
    }
    static double rwkvx_monotonic(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    #else
    static long rwkvx_preemptions(void) { return -1; }
    static double rwkvx_monotonic(void) { return 0.0; }
    #endif
    #if defined(__linux__)
    #include <fcntl.h>
    #include <unistd.h>
    #include <stdlib.h>
    #include <string.h>
    /* threads running or waiting for a CPU, machine-wide: /proc/loadavg's "R/T"; -1 if unknown */
    static long rwkvx_runnable(void) {
        char buf[128];
        int fd = open("/proc/loadavg", O_RDONLY);
        ssize_t n;
        char* slash;
        char* start;
        if (fd < 0) return -1;
        n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n <= 0) return -1;
        buf[n] = 0;
        slash = strchr(buf, '/');
        if (slash == NULL) return -1;
        start = slash;
        while (start > buf && start[-1] != ' ') start--;
        return strtol(start, NULL, 10);
    }
    #include <dirent.h>
    #include <stdio.h>
    /* of this process's threads, how many are running or waiting for a CPU; -1 if unknown */
    static long rwkvx_own_runnable(void) {
        char path[96], buf[512];
        struct dirent* entry;
        long n = 0;
        DIR* dir = opendir("/proc/self/task");
        if (dir == NULL) return -1;
        while ((entry = readdir(dir)) != NULL) {
            int fd;
            ssize_t k;
            char* paren;
            if (entry->d_name[0] == '.') continue;
            snprintf(path, sizeof(path), "/proc/self/task/%s/stat", entry->d_name);
            fd = open(path, O_RDONLY);
            if (fd < 0) continue;
            k = read(fd, buf, sizeof(buf) - 1);
            close(fd);
            if (k <= 0) continue;
            buf[k] = 0;
            /* "tid (comm) S ...": the state follows the last parenthesis */
            paren = strrchr(buf, ')');
            if (paren != NULL && paren[1] == ' ' && paren[2] == 'R') n++;
        }
        closedir(dir);
        return n;
    }
    #else
    static long rwkvx_runnable(void) { return -1; }
    static long rwkvx_own_runnable(void) { return -1; }
    #endif
    """
    long rwkvx_preemptions() noexcept nogil
    double rwkvx_monotonic() noexcept nogil
    long rwkvx_runnable() noexcept nogil
    long rwkvx_own_runnable() noexcept nogil

# seconds between decisions: several time slices, a few tokens
cdef double GOVERNOR_WINDOW_S = 0.05
# preemptions per second and thread of the team above which the cores count as contended.
# Measured on 2 cores, 430M decode with 2 threads: 330-460 a second in all next to busy
# processes; none at real-time priority, where nothing else could run, in bursts of half a
# second (4-44 in runs of several seconds, once the kernel's real-time throttling let
# others in). Per thread, so that many threads' background preemptions on a big machine
# never add up to a false alarm.
cdef double GOVERNOR_PREEMPTIONS_PER_THREAD_S = 50.0
# the window needs at least this many, so one stray kernel worker never counts
cdef long GOVERNOR_MIN_PREEMPTIONS = 3
# wait after a reduction before trying one more thread, doubled after each failed try
cdef double GOVERNOR_BACKOFF_S = 0.2
cdef double GOVERNOR_MAX_BACKOFF_S = 3.2
cdef int UNLIMITED = 1 << 30


cdef struct Governor:
    bint on
    int limit                 # the most threads a call may use now
    double window_start       # seconds
    long preempted_start      # ru_nivcsw at window_start
    double last_change        # when limit last changed
    bint trying               # the last change added a thread
    double backoff            # seconds to wait before adding a thread
    long reductions           # for thread_governor()
    int team                  # the team size handed out last
    int cpus                  # CPUs this process may use


cdef void _governor_reset(Governor* g, bint on, int cpus) noexcept nogil:
    g.on = on
    g.cpus = cpus
    g.limit = UNLIMITED
    g.window_start = -1.0
    g.preempted_start = 0
    g.last_change = -1e30
    g.trying = False
    g.backoff = GOVERNOR_BACKOFF_S
    g.reductions = 0
    g.team = 1


cdef bint _hot(Governor* g, double elapsed, long count) noexcept nogil:
    return count >= GOVERNOR_MIN_PREEMPTIONS and count >= GOVERNOR_PREEMPTIONS_PER_THREAD_S * elapsed * g.team


cdef int _governor_step(Governor* g, int n_threads, double now, long preempted, long runnable,
                        long others) noexcept nogil:
    # the decision, apart from the clock and the counters so that tests can drive it.
    # runnable: threads running or waiting for a CPU machine-wide, ours included (-1: unknown);
    # others: those of them not ours, read when a window was hot (-1: unknown)
    cdef double elapsed
    cdef long count
    if not g.on or n_threads <= 1 or preempted < 0:
        return n_threads
    if g.window_start < 0:
        g.window_start, g.preempted_start = now, preempted
    elapsed = now - g.window_start
    if elapsed >= GOVERNOR_WINDOW_S:
        count = preempted - g.preempted_start
        # preemptions with nothing else wanting a CPU were stray (kernel work, our own
        # threads trading places): fewer threads would only slow us down
        if _hot(g, elapsed, count) and others != 0:
            if min(g.limit, n_threads) > 1:
                if g.trying:
                    g.backoff = min(2 * g.backoff, GOVERNOR_MAX_BACKOFF_S)
                g.limit = min(g.limit, n_threads) - 1
                g.last_change, g.trying = now, False
                g.reductions += 1
        elif g.limit < n_threads:
            # a try costs a window of contended work when no CPU is free: skip it while the
            # others' runnable threads fill the CPUs ours do not (ours all count as runnable;
            # one asleep only makes a try likelier)
            if now - g.last_change >= g.backoff and (runnable < 0 or g.cpus - (runnable - g.team) > g.team):
                g.limit += 1
                g.last_change, g.trying = now, True
        elif g.trying and now - g.last_change >= GOVERNOR_MAX_BACKOFF_S:
            # the full team has run quietly for a while: contention has gone
            g.trying, g.backoff, g.limit = False, GOVERNOR_BACKOFF_S, UNLIMITED
        g.window_start, g.preempted_start = now, preempted
    g.team = min(n_threads, g.limit)
    return g.team


cdef Governor _governor
_governor_reset(&_governor, os.environ.get("RWKVX_ADAPTIVE_THREADS", "1").strip() != "0", usable_cpus())


cdef int kernel_threads(int n_threads) except -1:
    """What every kernel entry point runs with: n_threads checked (>= 1), then team_size."""
    if n_threads < 1:
        raise RwkvxError(f"n_threads: expected >= 1, got {n_threads}")
    return team_size(n_threads)


cdef int team_size(int n_threads) noexcept nogil:
    """The threads for the next kernel call: n_threads, or fewer while the process keeps
    being preempted. Called with the GIL held (from the kernels' def entry points), which
    serialises the governor's updates."""
    cdef double now = rwkvx_monotonic()
    # the counter costs a system call: read it only when a window closes
    cdef long preempted = _governor.preempted_start, runnable = -1, others = -1, own
    cdef bint hot
    if _governor.window_start < 0 or now - _governor.window_start >= GOVERNOR_WINDOW_S:
        preempted = rwkvx_preemptions()
        hot = _governor.window_start >= 0 and preempted >= 0 and \
            _hot(&_governor, now - _governor.window_start, preempted - _governor.preempted_start)
        if hot or _governor.limit < n_threads:
            runnable = rwkvx_runnable()
        if hot and runnable >= 0:
            # a hot window (rare on an idle machine): is anyone else runnable right now?
            own = rwkvx_own_runnable()
            if own >= 0:
                others = max(0, runnable - own)
    return _governor_step(&_governor, n_threads, now, preempted, runnable, others)


def adaptive_threads() -> bool:
    """True when kernel calls use fewer threads while the cores are contended (the default;
    RWKVX_ADAPTIVE_THREADS=0 at import, or set_adaptive_threads(False), turns it off)."""
    return _governor.on


def set_adaptive_threads(bint on) -> None:
    """Turn the contention governor on or off; either way it starts afresh."""
    _governor_reset(&_governor, on, usable_cpus())


def thread_governor() -> dict:
    """The governor's state: on, limit (None when unlimited), backoff_s, reductions so far."""
    return {"on": _governor.on, "limit": None if _governor.limit == UNLIMITED else _governor.limit,
            "backoff_s": _governor.backoff, "reductions": _governor.reductions}


def _simulate_governor(list steps, int cpus=2) -> list:
    """Team sizes a fresh governor hands out for (n_threads, seconds, preemptions[, runnable[,
    others]]) steps on a machine of cpus usable CPUs (tests)."""
    cdef Governor g
    _governor_reset(&g, True, cpus)
    return [_governor_step(&g, step[0], step[1], step[2], step[3] if len(step) > 3 else -1,
                           step[4] if len(step) > 4 else -1) for step in steps]


def _runnable_now() -> tuple:
    """(threads runnable machine-wide, this process's runnable threads); -1 where unknown (tests)."""
    return rwkvx_runnable(), rwkvx_own_runnable()


def team_size_now(int n_threads) -> int:
    """team_size for Python callers (it updates the process's governor)."""
    return team_size(n_threads)


def threads_info() -> str:
    """One line for --info: the default thread count and why, how threads wait, the governor."""
    governor = "on" if _governor.on else "off (RWKVX_ADAPTIVE_THREADS=0)"
    return (f"threads {thread_policy()[1]}; waiting: {wait_policy()}; "
            f"fewer threads while the cores are contended: {governor}")


def effective_n_threads(n_threads=None) -> int:
    """The number of threads kernels will use.

    None follows thread_policy(): OMP_NUM_THREADS, else the CPUs this process may use
    (affinity and cgroup quota). An explicit count must be a positive int. Without OpenMP
    it is always 1.
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
        return thread_policy()[0]
    return n_threads
