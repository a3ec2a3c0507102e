"""The thread policy: default thread count from affinity and cgroup quotas, and how OpenMP threads wait."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

import rwkvx
from rwkvx.kernels import _parallel
from rwkvx.errors import RwkvxError

needs_openmp = pytest.mark.skipif(not _parallel.openmp_enabled(), reason="built without OpenMP")
OPENMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_DISPLAY_ENV", "RWKVX_ADAPTIVE_THREADS")


def fake_cgroup(tmp_path, membership: str, files: dict[str, str]):
    """(root, self_cgroup) paths: a /proc/self/cgroup with membership, and files under a fake mount root."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(membership)
    return str(root), str(self_cgroup)


@pytest.fixture
def no_omp_env(monkeypatch):
    for name in OPENMP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


# ---- cgroup quota detection ----

@pytest.mark.parametrize("cpu_max, want", [
    ("150000 100000\n", 1.5),
    ("100000 100000\n", 1.0),
    ("50000 100000\n", 0.5),
    ("200000 50000\n", 4.0),
    ("max 100000\n", None),
    ("garbage\n", None),
    ("", None),
])
def test_cgroup_v2_cpu_max(tmp_path, cpu_max, want):
    root, me = fake_cgroup(tmp_path, "0::/system.slice/app.service\n",
                           {"system.slice/app.service/cpu.max": cpu_max})
    assert _parallel.cgroup_cpu_limit(root, me) == want


def test_cgroup_v2_parent_quota_limits_child(tmp_path):
    root, me = fake_cgroup(tmp_path, "0::/outer/inner\n",
                           {"outer/cpu.max": "100000 100000", "outer/inner/cpu.max": "max 100000"})
    assert _parallel.cgroup_cpu_limit(root, me) == 1.0


def test_cgroup_v2_smallest_quota_wins(tmp_path):
    root, me = fake_cgroup(tmp_path, "0::/outer/inner\n",
                           {"outer/cpu.max": "300000 100000", "outer/inner/cpu.max": "120000 100000"})
    assert _parallel.cgroup_cpu_limit(root, me) == pytest.approx(1.2)


def test_cgroup_v2_hybrid_mount(tmp_path):
    root, me = fake_cgroup(tmp_path, "1:cpu:/\n0::/\n", {"unified/cpu.max": "100000 100000"})
    assert _parallel.cgroup_cpu_limit(root, me) == 1.0


@pytest.mark.parametrize("quota, period, want", [
    ("100000", "100000", 1.0),
    ("150000", "100000", 1.5),
    ("25000", "100000", 0.25),
    ("-1", "100000", None),
    ("x", "100000", None),
])
def test_cgroup_v1_cfs_quota(tmp_path, quota, period, want):
    root, me = fake_cgroup(tmp_path, "5:cpuacct,cpu:/docker/abc\n4:memory:/docker/abc\n",
                           {"cpuacct,cpu/docker/abc/cpu.cfs_quota_us": quota,
                            "cpuacct,cpu/docker/abc/cpu.cfs_period_us": period})
    assert _parallel.cgroup_cpu_limit(root, me) == want


def test_cgroup_v1_container_without_cgroup_namespace(tmp_path):
    # /proc/self/cgroup names the host's path, which does not exist inside the container:
    # the quota is at the mount point itself
    root, me = fake_cgroup(tmp_path, "3:cpu,cpuacct:/kubepods/pod1/c0ffee\n",
                           {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"})
    assert _parallel.cgroup_cpu_limit(root, me) == 1.0


def test_cgroup_v1_without_cpu_controller(tmp_path):
    root, me = fake_cgroup(tmp_path, "4:memory:/a\n", {"memory/a/cpu.cfs_quota_us": "100000",
                                                       "memory/a/cpu.cfs_period_us": "100000"})
    assert _parallel.cgroup_cpu_limit(root, me) is None


def test_cgroup_unreadable(tmp_path):
    assert _parallel.cgroup_cpu_limit(str(tmp_path), str(tmp_path / "missing")) is None
    root, me = fake_cgroup(tmp_path, "not a cgroup line\n", {})
    assert _parallel.cgroup_cpu_limit(root, me) is None


@pytest.mark.parametrize("quota, want", [(0.1, 1), (0.5, 1), (1.0, 1), (1.4, 1), (1.5, 2), (2.0, 2), (3.7, 4)])
def test_threads_for_quota(quota, want):
    assert _parallel.threads_for_quota(quota) == want


# ---- the default thread count and its reason ----

@needs_openmp
@pytest.mark.parametrize("cpu_max, want", [("100000 100000", 1), ("50000 100000", 1), ("150000 100000", 2),
                                           ("140000 100000", 1), ("400000 100000", 2), ("max 100000", 2)])
def test_policy_follows_quota_and_affinity(tmp_path, no_omp_env, two_cpus, cpu_max, want):
    root, me = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    n, reason = _parallel.thread_policy(root, me)
    assert n == want
    assert reason.startswith(f"{want} (")
    assert "2 CPUs usable" in reason
    assert ("no cgroup quota" in reason) == (cpu_max == "max 100000")


@needs_openmp
def test_policy_reason_for_one_cpu_quota(tmp_path, no_omp_env, two_cpus):
    root, me = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    assert _parallel.thread_policy(root, me) == (1, "1 (cgroup quota 1.0 CPU; 2 CPUs usable)")


@needs_openmp
@pytest.mark.parametrize("value, want", [("3", 3), ("1", 1), (" 2 ", 2), ("3,2", 3)])
def test_omp_num_threads_wins_over_quota(tmp_path, monkeypatch, two_cpus, value, want):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    root, me = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    assert _parallel.thread_policy(root, me) == (want, f"{want} (OMP_NUM_THREADS)")


@needs_openmp
@pytest.mark.parametrize("value", ["0", "-1", "two", ","])
def test_bad_omp_num_threads_is_ignored_and_said(tmp_path, monkeypatch, two_cpus, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    root, me = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000"})
    n, reason = _parallel.thread_policy(root, me)
    assert n == 2
    assert f"OMP_NUM_THREADS={value!r} ignored" in reason


@needs_openmp
def test_huge_omp_num_threads_is_capped(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    n, reason = _parallel.thread_policy()
    assert n == _parallel.max_threads()
    assert "capped" in reason


@needs_openmp
def test_effective_n_threads_defaults_to_policy(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _parallel.effective_n_threads(None) == 3
    assert _parallel.effective_n_threads(1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _parallel.effective_n_threads(None) == _parallel.thread_policy()[0]


def test_explicit_threads_are_checked():
    with pytest.raises(RwkvxError, match="threads"):
        _parallel.effective_n_threads(0)


# ---- the contention governor: fewer threads while the process keeps being preempted ----

def _steps(n, times, preemptions):
    return [(n, t, p) for t, p in zip(times, preemptions)]


def test_governor_keeps_every_thread_on_a_quiet_machine():
    times = [0.01 * i for i in range(200)]
    # a stray preemption now and then (kernel workers) is not contention
    counts = [i // 50 for i in range(200)]
    assert set(_parallel._simulate_governor(_steps(4, times, counts))) == {4}


def test_governor_drops_one_thread_per_busy_window_down_to_one():
    times = [0.0, 0.051, 0.102, 0.153, 0.204, 0.255]
    counts = [0, 20, 40, 60, 80, 100]       # 400 preemptions a second
    assert _parallel._simulate_governor(_steps(4, times, counts)) == [4, 3, 2, 1, 1, 1]


def test_governor_threshold_grows_with_the_team():
    # 235 preemptions a second: contention for a team of 4 (59 each), not for 8 (29 each)
    times, counts = [0.0, 0.051, 0.102], [0, 12, 24]
    assert _parallel._simulate_governor(_steps(4, times, counts)) == [4, 3, 2]
    assert _parallel._simulate_governor(_steps(8, times, counts)) == [8, 8, 8]


def test_governor_threshold():
    # for two threads, 4 preemptions in a window (78 a second) are tolerated, 6 (118) are not
    assert _parallel._simulate_governor(_steps(2, [0.0, 0.051, 0.102], [0, 4, 8])) == [2, 2, 2]
    assert _parallel._simulate_governor(_steps(2, [0.0, 0.051, 0.102], [0, 6, 12])) == [2, 1, 1]
    # and a single thread's requests are never cut
    assert _parallel._simulate_governor(_steps(1, [0.0, 0.051, 0.102], [0, 60, 120])) == [1, 1, 1]


def test_governor_tries_again_and_backs_off():
    # busy until 0.05; then quiet: after the 0.2 s back-off it tries two threads again
    steps = _steps(2, [0.0, 0.06, 0.12, 0.20, 0.27, 0.33], [0, 10, 10, 10, 10, 10])
    assert _parallel._simulate_governor(steps) == [2, 1, 1, 1, 2, 2]
    # the try meets contention again: back to one, and the next try waits twice as long
    steps = _steps(2, [0.0, 0.06, 0.27, 0.33, 0.60, 0.70, 0.76], [0, 10, 10, 30, 30, 30, 30])
    assert _parallel._simulate_governor(steps) == [2, 1, 2, 1, 1, 1, 2]


def test_governor_tries_only_when_a_cpu_is_free():
    # reduced to one thread on 2 CPUs; quiet since, but a busy process keeps the other CPU
    # (2 runnable: ours and it), so no try until it stops (1 runnable: ours)
    steps = [(2, 0.0, 0, -1), (2, 0.06, 10, -1), (2, 0.3, 10, 2), (2, 0.6, 10, 2), (2, 0.9, 10, 1), (2, 0.96, 10, 2)]
    assert _parallel._simulate_governor(steps, cpus=2) == [2, 1, 1, 1, 2, 2]
    # on 4 CPUs, one busy process leaves a CPU free for a second thread
    steps = [(2, 0.0, 0, -1), (2, 0.06, 10, -1), (2, 0.3, 10, 2)]
    assert _parallel._simulate_governor(steps, cpus=4) == [2, 1, 2]


def test_governor_never_adds_threads_beyond_the_request():
    steps = _steps(3, [0.05 * i for i in range(40)], [0] * 40)
    assert max(_parallel._simulate_governor(steps)) == 3
    assert set(_parallel._simulate_governor(_steps(1, [0.0, 0.05, 0.1], [0, 50, 100]))) == {1}


def test_governor_off_hands_out_the_request(monkeypatch):
    try:
        _parallel.set_adaptive_threads(False)
        assert not _parallel.adaptive_threads()
        assert [_parallel.team_size_now(n) for n in (1, 2, 5)] == [1, 2, 5]
        assert _parallel.thread_governor()["on"] is False
    finally:
        _parallel.set_adaptive_threads(True)
    assert _parallel.adaptive_threads()


def test_governor_switch_from_the_environment(tmp_path):
    code = "import rwkvx; from rwkvx.kernels._parallel import adaptive_threads; print(adaptive_threads())"
    assert _run(code, tmp_path, {"RWKVX_ADAPTIVE_THREADS": "0"}).stdout.strip() == "False"
    assert _run(code, tmp_path).stdout.strip() == "True"


def test_threads_info_names_all_three(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    info = _parallel.threads_info()
    assert info.startswith("threads 3 (OMP_NUM_THREADS); waiting: ")
    assert _parallel.wait_policy() in info
    assert info.endswith("contended: on")


# ---- in fresh interpreters: real affinity and the OpenMP environment ----

def _run(code: str, tmp_path, env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    # outside the source tree, whose uncompiled rwkvx/ would shadow the installed package
    base = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    return subprocess.run([sys.executable, "-c", code], env={**base, **(env or {})}, cwd=tmp_path,
                          capture_output=True, text=True, check=True, preexec_fn=preexec_fn)


@needs_openmp
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity control")
def test_default_follows_real_affinity(tiny_path, tmp_path):
    first = min(os.sched_getaffinity(0))
    code = ("import sys, rwkvx; from rwkvx.kernels._parallel import thread_policy; "
            "print(rwkvx.load(sys.argv[1]).n_threads); print(thread_policy()[1])")
    out = _run(code.replace("sys.argv[1]", repr(str(tiny_path))), tmp_path,
               preexec_fn=lambda: os.sched_setaffinity(0, {first})).stdout.splitlines()
    assert out[0] == "1"
    assert "1 CPU usable" in out[1]


def _display_env(stderr: str) -> dict[str, str]:
    # OMP_DISPLAY_ENV=verbose makes libgomp print its settings as it loads: "  NAME = 'VALUE'"
    out = {}
    for line in stderr.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep:
            out[name.split(" ")[-1]] = value.strip("'")
    return out


WAIT_CODE = ("import os, rwkvx; from rwkvx.kernels._parallel import wait_policy; "
             "print(wait_policy()); print(os.environ.get('GOMP_SPINCOUNT'))")


def _libgomp_settings(tmp_path, env: dict, code: str = WAIT_CODE) -> tuple[list[str], dict]:
    done = _run(code, tmp_path, {"OMP_DISPLAY_ENV": "verbose", **env})
    settings = _display_env(done.stderr)
    if "GOMP_SPINCOUNT" not in settings:
        pytest.skip("the OpenMP runtime is not libgomp")
    return done.stdout.splitlines(), settings


@needs_openmp
def test_rwkvx_bounds_the_spin_when_nothing_is_set(tmp_path):
    out, settings = _libgomp_settings(tmp_path, {})
    assert settings["GOMP_SPINCOUNT"] == "10000"
    assert "rwkvx" in out[0]
    # set only while libgomp loads: programs the user starts see their own environment
    assert out[1] == "None"


@needs_openmp
@pytest.mark.parametrize("env, spin", [({"OMP_WAIT_POLICY": "passive"}, "0"),
                                       ({"OMP_WAIT_POLICY": "active"}, "30000000000"),
                                       ({"GOMP_SPINCOUNT": "5000"}, "5000")])
def test_user_wait_settings_are_left_alone(tmp_path, env, spin):
    out, settings = _libgomp_settings(tmp_path, env)
    assert settings["GOMP_SPINCOUNT"] == spin
    assert out[0].endswith("(set by you)")
    assert out[1] == env.get("GOMP_SPINCOUNT", "None")


@needs_openmp
def test_libgomp_loaded_first_is_reported(tmp_path):
    code = "import ctypes; ctypes.CDLL('libgomp.so.1'); " + WAIT_CODE
    try:
        out, settings = _libgomp_settings(tmp_path, {}, code)
    except subprocess.CalledProcessError:
        pytest.skip("no libgomp.so.1 to load")
    assert settings["GOMP_SPINCOUNT"] == "300000"
    assert "loaded before rwkvx" in out[0]


# ---- a real cgroup, where the test may create one ----

def _v1_cpu_cgroup():
    base = "/sys/fs/cgroup/cpu"
    if not os.path.isfile(os.path.join(base, "cpu.cfs_quota_us")):
        return None
    path = os.path.join(base, f"rwkvx-test-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    return path


@needs_openmp
@pytest.mark.skipif(sys.platform != "linux", reason="cgroups are Linux's")
def test_real_cgroup_quota_of_one_cpu(tiny_path, tmp_path):
    path = _v1_cpu_cgroup()
    if path is None:
        pytest.skip("cannot create a cgroup v1 cpu group here")
    try:
        with open(os.path.join(path, "cpu.cfs_period_us")) as f:
            period = int(f.read())
        with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(period))

        def enter():
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

        code = (f"import rwkvx; from rwkvx.kernels._parallel import thread_policy; "
                f"print(rwkvx.load({str(tiny_path)!r}).n_threads); print(thread_policy()[1])")
        out = _run(code, tmp_path, preexec_fn=enter).stdout.splitlines()
    finally:
        os.rmdir(path)
    assert out[0] == "1"
    assert "cgroup quota 1.0 CPU" in out[1]


# ---- results do not depend on how many threads share the work ----

@needs_openmp
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_default_threads_match_one_thread(tiny_path, dtype):
    tokens = list(range(12))
    default = rwkvx.load(tiny_path, dtype=dtype)
    one = rwkvx.load(tiny_path, dtype=dtype, threads=1)
    many = rwkvx.load(tiny_path, dtype=dtype, threads=_parallel.max_threads())
    batch = [[1, 2], [3], [4, 5, 6]]
    want = one.forward(tokens)
    for model in (default, many):
        got = model.forward(tokens)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert np.array_equal(model.forward_batch(batch)[0], one.forward_batch(batch)[0])


def test_governor_ignores_preemptions_while_nothing_else_is_runnable():
    # 400 preemptions a second, but at each hot window no other thread wanted a CPU
    steps = [(2, 0.0, 0, -1, -1), (2, 0.051, 20, 2, 0), (2, 0.102, 40, 2, 0), (2, 0.153, 60, 3, 1)]
    assert _parallel._simulate_governor(steps) == [2, 2, 2, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_own_runnable_threads_are_counted():
    runnable, own = _parallel._runnable_now()
    assert own >= 1  # this thread, running
    assert runnable >= 1
