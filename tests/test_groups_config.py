"""Resource groups, client assignment and config validation."""

import numpy as np
import pytest

from fedhello.config import GroupConfig, load_config
from fedhello.errors import UserError
from fedhello.method.groups import (
    assign_clients_to_groups,
    group_sizes,
    resolve_groups,
    sample_clients,
)


def test_budgets_absolute_and_fractional() -> None:
    groups = resolve_groups(
        [
            GroupConfig(name="a", share=1, budget=0.5),
            GroupConfig(name="b", share=1, budget=0.75),
            GroupConfig(name="c", share=1, budget=1.0),
            GroupConfig(name="d", share=1, budget=4),
        ],
        12,
        16,
    )
    assert [g.budget for g in groups] == [6, 9, 12, 4]
    assert [g.rank for g in groups] == [8, 12, 16, 5]  # parameter-matched default ranks
    assert [g.budget for g in resolve_groups([GroupConfig(name="a", share=1, budget=0.75)], 6, 16)] == [4]
    released = resolve_groups([GroupConfig(name="a", share=1, budget=6, rank=4)], 12, 16)
    assert released[0].rank == 4  # e.g. the released 4/8/16
    with pytest.raises(UserError, match=r"groups\.0\.rank"):
        resolve_groups([GroupConfig(name="a", share=1, budget=6, rank=32)], 12, 16)
    with pytest.raises(UserError, match=r"groups\.0\.budget"):
        resolve_groups([GroupConfig(name="a", share=1, budget=13)], 12, 16)


def test_group_sizes_follow_shares() -> None:
    assert group_sizes(20, [6, 3, 1]) == [12, 6, 2]
    assert group_sizes(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(group_sizes(7, [6, 3, 1])) == 7


def test_assignment_is_seeded_and_respects_sizes() -> None:
    groups = resolve_groups(
        [GroupConfig(name=n, share=s, budget=1) for n, s in [("l", 6), ("m", 3), ("h", 1)]], 4, 16
    )
    a = assign_clients_to_groups(20, groups, seed=3)
    assert np.bincount(a).tolist() == [12, 6, 2]
    assert np.array_equal(a, assign_clients_to_groups(20, groups, seed=3))
    assert not np.array_equal(a, assign_clients_to_groups(20, groups, seed=4))


def test_client_sampling_without_replacement_and_seeded() -> None:
    s = sample_clients(20, 5, seed=0, round_number=1)
    assert len(set(s)) == 5 and s == sorted(s)
    assert s == sample_clients(20, 5, seed=0, round_number=1)
    rounds = {tuple(sample_clients(20, 5, seed=0, round_number=r)) for r in range(1, 10)}
    assert len(rounds) > 1


def test_config_defaults_and_overrides() -> None:
    cfg = load_config(
        None, ["train.lr=0.01", "groups=[{name: a, share: 1, budget: 0.5}]", "method=gd-uniform"]
    )
    assert cfg.train.lr == 0.01
    assert cfg.groups[0].budget == 0.5
    assert cfg.lora.r == 16 and cfg.lora.alpha == 16 and cfg.lora.dropout == 0.1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "train.lrr: unknown key"),
        ("train.lr=-1", "train.lr"),
        ("method=gd-pyramid", "method: unknown method 'gd-pyramid'"),
        ("federation.clients_per_round=50", "clients_per_round must not exceed"),
        ("groups=[{name: a, share: 1, budget: 1.5}]", "groups.0.budget"),
        ("data.source=csv", "data.path is required"),
        ("nonsense", "expected key=value"),
        ("engine=ray", "engine: unknown engine 'ray'"),
        ("task=tabular", "task: unknown task 'tabular'"),
        ("train.freezing=lr0", "freezing: 'lr0' is not a run's mode"),
    ],
)
def test_bad_config_names_the_key(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_config_file_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("federation:\n  rounds: 3\n")
    assert load_config(good, ["federation.rounds=4"]).federation.rounds == 4
