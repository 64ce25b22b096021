"""Training memory measured two independent ways must agree on what matters.

fedhello's CPU account (`MemoryMeter`: saved activations, gradients, optimizer state) is checked
against the operating system's view: the peak resident-set increase of a separate process
during the same training. The account covers only what training keeps alive, so it must be
positive and no larger than the real increase, and both must see that training the top block
alone costs clearly less than training all four."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")


def _probe(*allocations: str) -> list[dict[str, int]]:
    """One process per allocation, side by side (each measures only itself)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(PROBE), a], stdout=subprocess.PIPE, text=True, env=env)
        for a in allocations
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak resident set"
)
def test_memory_account_agrees_with_the_resident_set_of_a_separate_process() -> None:
    top, every = _probe("3", "0,1,2,3")
    for m in (top, every):
        assert 0 < m["meter_bytes"] <= m["rss_increase_bytes"], m
    # the independent measurement sees the saving too, and it is not noise: at least 50 MB and
    # at least half of the saving the account claims
    saved_by_account = every["meter_bytes"] - top["meter_bytes"]
    saved_in_rss = every["rss_increase_bytes"] - top["rss_increase_bytes"]
    assert saved_by_account > 50e6
    assert saved_in_rss > max(50e6, 0.5 * saved_by_account), (top, every)
