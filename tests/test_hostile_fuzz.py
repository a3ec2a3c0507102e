"""The fuzzer's seeded CI slice (scripts/fuzz.py --ci): mutated files of every format, each
loaded in a worker process under a 1.5 GB address-space limit and a 10 s timeout, must end
in a finite load or one clean RwkvxError line. A failure prints the cases to replay."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py"


def test_fuzz_ci_slice():
    if not FUZZ.exists():
        pytest.skip("scripts/fuzz.py is not beside the tests")
    result = subprocess.run([sys.executable, str(FUZZ), "--ci", "--json"], capture_output=True, text=True,
                            timeout=900)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    counts = summary["counts"]
    # every format ran, and most cases ended in an error, some in a load: the slice tests something
    assert all(sum(outcomes.values()) > 100 for outcomes in counts.values()), counts
    assert sum(outcomes.get("loaded", 0) for outcomes in counts.values()) > 100, counts
    replay = [f"python scripts/fuzz.py --replay {fmt} {seed} {index}  # {outcome}"
              for fmt, seed, index, outcome in summary["findings"]]
    assert not replay, "\n".join(replay)
    assert result.returncode == 0, result.stderr[-2000:]
