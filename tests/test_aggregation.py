"""Per-tensor aggregation against hand-computed numbers, and screening of bad updates."""

import math

import pytest
import torch

from fedhello.method.aggregation import (
    ClientUpdate,
    Expected,
    aggregate_per_tensor,
    payload_bytes,
    screen_updates,
)


def _global() -> dict[str, torch.Tensor]:
    return {
        "a": torch.tensor([1.0, 2.0]),
        "b": torch.tensor([0.0]),
        "c": torch.tensor([5.0, 5.0, 5.0]),
        "head": torch.tensor([10.0]),
    }


def _updates() -> list[ClientUpdate]:
    return [
        ClientUpdate(1, {"a": torch.tensor([1.0, 1.0]), "head": torch.tensor([2.0])}, num_samples=10),
        ClientUpdate(
            2, {"a": torch.tensor([3.0, -1.0]), "b": torch.tensor([4.0]), "head": torch.tensor([0.0])}, 30
        ),
    ]


def test_weighted_mean_over_clients_that_trained_each_tensor() -> None:
    new = aggregate_per_tensor(_global(), _updates(), "samples")
    # a: 1/4 * [1, 1] + 3/4 * [3, -1] = [2.5, -0.5]; b: only client 2 trained it -> full change.
    torch.testing.assert_close(new["a"], torch.tensor([3.5, 1.5]))
    torch.testing.assert_close(new["b"], torch.tensor([4.0]))
    torch.testing.assert_close(new["head"], torch.tensor([10.5]))
    torch.testing.assert_close(new["c"], torch.tensor([5.0, 5.0, 5.0]))  # nobody trained it


def test_unweighted_mean() -> None:
    new = aggregate_per_tensor(_global(), _updates(), "uniform")
    torch.testing.assert_close(new["a"], torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(new["b"], torch.tensor([4.0]))
    torch.testing.assert_close(new["head"], torch.tensor([11.0]))


def test_aggregation_does_not_modify_its_inputs() -> None:
    g = _global()
    aggregate_per_tensor(g, _updates())
    torch.testing.assert_close(g["a"], torch.tensor([1.0, 2.0]))


def test_payload_bytes_is_exact() -> None:
    assert payload_bytes({"x": torch.zeros(3, 4), "y": torch.zeros(2, dtype=torch.float16)}) == 48 + 4


@pytest.mark.parametrize(
    ("deltas", "reason"),
    [
        ({"zzz": torch.zeros(2)}, "unknown tensor"),
        ({"a": torch.zeros(3)}, "shape"),
        ({"c": torch.zeros(3)}, "outside the client's allocation"),
        ({"a": torch.tensor([math.nan, 0.0])}, "non-finite"),
        ({"a": torch.tensor([math.inf, 0.0])}, "non-finite"),
    ],
)
def test_bad_updates_are_rejected_and_the_rest_aggregated(deltas: dict, reason: str) -> None:
    g = _global()
    good = ClientUpdate(1, {"a": torch.tensor([1.0, 1.0])}, 10)
    bad = ClientUpdate(9, deltas, 10)
    shapes = {k: tuple(v.shape) for k, v in g.items()}
    allowed = {
        1: Expected({"a": shapes["a"]}, 10),
        9: Expected({k: shapes[k] for k in ("a", "b", "head")}, 10),
    }
    accepted, rejected = screen_updates([good, bad], g, allowed)
    assert [u.client_id for u in accepted] == [1]
    assert reason in rejected[9]
    new = aggregate_per_tensor(g, accepted)
    torch.testing.assert_close(new["a"], torch.tensor([2.0, 3.0]))
    assert all(torch.isfinite(v).all() for v in new.values())
