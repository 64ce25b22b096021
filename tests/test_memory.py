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


def _probe(layers: str) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(PROBE), layers], capture_output=True, text=True, check=True, env=env, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak resident set"
)
def test_memory_account_agrees_with_the_resident_set_of_a_separate_process() -> None:
    top = _probe("3")
    every = _probe("0,1,2,3")
    for m in (top, every):
        assert 0 < m["meter_bytes"] <= m["rss_increase_bytes"], m
    # the independent measurement sees the saving too, and it is not noise: at least 50 MB and
    # at least half of the saving the account claims
    saved_by_account = every["meter_bytes"] - top["meter_bytes"]
    saved_in_rss = every["rss_increase_bytes"] - top["rss_increase_bytes"]
    assert saved_by_account > 50e6
    assert saved_in_rss > max(50e6, 0.5 * saved_by_account), (top, every)
