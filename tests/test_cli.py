"""The light commands: allocate and partition."""

from __future__ import annotations

import json

import pytest

from fedhello.cli import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_allocate_reproduces_spec_bottleneck(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(
        capsys,
        [
            "allocate",
            "--strategy",
            "gd",
            "--pattern",
            "bottleneck",
            "--num-layers",
            "12",
            "--budgets",
            "6,9,12",
            "--json",
        ],
    )
    assert [g["layers"] for g in out["groups"]] == [
        [0, 1, 2, 9, 10, 11],
        [0, 1, 2, 3, 4, 8, 9, 10, 11],
        list(range(12)),
    ]
    assert out["collective_counts"] == [3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3]


def test_allocate_fractions_shares_and_sampling(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(
        capsys,
        [
            "allocate",
            "--strategy",
            "rgd",
            "--pattern",
            "bottleneck",
            "--num-layers",
            "12",
            "--budgets",
            "0.5,0.75,1.0",
            "--shares",
            "6,3,1",
            "--draws",
            "2000",
            "--json",
        ],
    )
    assert [g["budget"] for g in out["groups"]] == [6, 9, 12]
    assert sum(out["probabilities"]) == pytest.approx(1, abs=1e-5)
    low = out["groups"][0]["inclusion_frequency"]
    assert sum(low) == pytest.approx(6, abs=1e-3)
    assert max(low) / min(low) < max(out["probabilities"]) / min(out["probabilities"])  # flatter than p
    table = main(
        ["allocate", "--strategy", "gd", "--pattern", "uniform", "--num-layers", "6", "--budgets", "3"]
    )
    assert table == 0 and "x" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "gd", "--num-layers", "12", "--budgets", "6"], "--pattern is required"),
        (["--strategy", "full", "--num-layers", "12", "--budgets", "6,x"], "--budgets: 'x' is not a number"),
        (["--strategy", "full", "--num-layers", "12", "--budgets", "6,9", "--shares", "1"], "--shares"),
        (["--strategy", "full", "--num-layers", "12", "--budgets", "13"], "13 layers requested"),
    ],
)
def test_allocate_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["allocate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_partition_prints_sizes_and_histograms(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(
        capsys,
        [
            "partition",
            "partition.scheme=pathological",
            "partition.num_clients=10",
            "partition.classes_per_client=2",
            "--json",
        ],
    )
    clients = out["clients"]
    assert len(clients) == 10
    assert all(sum(1 for n in c["histogram"] if n > 0) <= 2 for c in clients)
    assert all(sum(c["histogram"]) == c["size"] for c in clients)
    assert main(["partition", "partition.scheme=iid", "partition.num_clients=5"]) == 0
    assert "client" in capsys.readouterr().out.lower()
