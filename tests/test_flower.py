"""The Flower engine: simulation and a real deployment (separate SuperLink, nginx proxy and
SuperNode processes on loopback, TLS, node authentication, partitions bound to keys, warm
ClientApps) give the in-process engine's results; a dead SuperNode and a malformed reply do not
stop a run; only registered SuperNodes join and the Control API is not client-facing; a run cut
off mid-way resumes from its checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from flower_deployment import TestDeployment
from helpers import run_simulated
from safetensors.torch import load_file

from fedhello import load_config, run_experiment
from fedhello.deploy.certificates import make_supernode_keys
from fedhello.deploy.federation import FEDERATION, LocalDeployment
from fedhello.deploy.proxy import find_nginx
from fedhello.engine.client import ClientResult
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.engine.local import local_trainer
from fedhello.engine.loop import TrainRound, run_federation
from fedhello.engine.server import FederatedServer
from fedhello.flower.server_app import rejected_result
from fedhello.method.aggregation import payload_bytes
from fedhello.method.base import RoundPlan

pytestmark = pytest.mark.slow  # Flower simulation and SuperLink/SuperNode processes

# Under pytest-xdist (scripts/test.sh runs two workers) each kind runs on one worker, one test at
# a time: two Ray clusters or two deployments at once would only compete for the same two cores.
on_ray = pytest.mark.xdist_group("ray")
on_deployment = pytest.mark.xdist_group("deployment")

needs_nginx = pytest.mark.skipif(
    find_nginx() is None and not os.environ.get("FEDHELLO_REQUIRE_NGINX"),
    reason="nginx is not installed (apt-get install nginx-light): the secured deployment puts it in front "
    "of the SuperLink; scripts/test.sh installs it where it runs as root",
)


def _config_file(tmp_path: Path, overrides: list[str], name: str = "cfg.yaml") -> Path:
    """The experiment as a YAML file with absolute paths, as deployment processes need it."""
    cfg = load_config(overrides=overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _base(tiny_overrides: Callable[..., list[str]], *extra: str) -> list[str]:
    # 3 clients, one per SuperNode, all sampled; groups train 1, 2 and 4 of the 4 blocks
    return tiny_overrides(
        "partition.num_clients=3",
        "federation.clients_per_round=3",
        "federation.rounds=2",
        "method=rgd-bottleneck",
        "groups=[{name: low, share: 1, budget: 1}, {name: mid, share: 1, budget: 2}, {name: high, share: 1, budget: 4}]",
        *extra,
    )


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((run_dir / "checkpoint").glob("adapters-round*.safetensors"))[-1])


def _assert_same_run(a: Path, b: Path, rounds: int | None = None) -> None:
    """Same records (the first `rounds` of each, if given) and the same final adapters."""
    ra, rb = _records(a)[:rounds], _records(b)[:rounds]
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x["metrics"].keys() == y["metrics"].keys()
        for split, metrics in x["metrics"].items():
            assert metrics == pytest.approx(y["metrics"][split], abs=1e-6), split
        for key in ("bytes_up", "bytes_down"):
            assert x[key] == y[key], key
        cx = [(c["client"], c["layers"], c["bytes_up"], c["samples"], c["steps"]) for c in x["clients"]]
        cy = [(c["client"], c["layers"], c["bytes_up"], c["samples"], c["steps"]) for c in y["clients"]]
        assert cx == cy
        assert [c.get("train_loss", math.nan) for c in x["clients"]] == pytest.approx(
            [c.get("train_loss", math.nan) for c in y["clients"]],
            abs=1e-6,
            nan_ok=True,  # a rejected reply has none, nor does a client under differential privacy
        )
        assert x.get("epsilon") == y.get("epsilon")
    wa, wb = _adapters(a), _adapters(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def _wait_for_round(run_dir: Path, round_number: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and len(_records(run_dir)) >= round_number:
            return
        time.sleep(0.2)
    raise AssertionError(f"round {round_number} did not finish within {timeout:.0f} s")


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("flora", ()),  # rank slices, the update merged into the base weights clients download
        ("hetlora", ("hetlora.self_pruning=true",)),  # rank slices, with self-pruning
        ("fed-pilot", ("federation.aggregation=lora_fair",)),  # knapsack layer sets, LoRA-FAIR's corrected B
        (  # central differential privacy: Poisson sampling, client clipping, the server's noise
            "fedhello",
            ("privacy.mode=central", "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.5"),
        ),
        # secure aggregation: keys, shares, masked inputs and unmasking as message rounds
        ("fedhello", ("secure_aggregation.enabled=true", "secure_aggregation.neighbours=2")),
    ],
)
@on_ray
def test_simulation_engine_equals_in_process(
    method: str, extra: tuple[str, ...], tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    overrides = _base(tiny_overrides, f"method={method}", *extra)
    run_experiment(load_config(overrides=overrides), tmp_path / "local")
    proc = run_simulated(overrides, tmp_path / "sim")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(tmp_path / "local", tmp_path / "sim")
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2


@on_ray
def test_a_simulated_round_without_replies_ends_in_one_line_exit_2(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # replies cannot arrive within 1 ms; discovery still waits for its nodes (connect_timeout=1).
    # One Ray actor (ClientApp process) serves the three nodes, on any machine: a ClientApp reserves
    # every CPU Ray counts (os.cpu_count(), with RAY_USE_MULTIPROCESSING_CPU_COUNT in the run's
    # environment). Each further actor only adds its start-up: 6-13 s of this test on a busy 2-core
    # machine, where the actors' imports compete for the cores with the server's.
    monkeypatch.setenv("RAY_USE_MULTIPROCESSING_CPU_COUNT", "1")
    overrides = _base(
        tiny_overrides,
        "flower.round_timeout=0.001",
        "flower.connect_timeout=1",
        f"flower.cpus_per_client={os.cpu_count() or 1}",
    )
    proc = run_simulated(overrides, tmp_path / "sim")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedhello: error: round 1: 0 replies, fewer than flower.min_replies=1; "), last
    assert "missing clients [0, 1, 2]" in last and "raise flower.round_timeout" in last, last
    assert "no SuperNode answered" not in last, last  # every node was found


@needs_nginx
@on_deployment
def test_deployment_with_tls_and_auth_equals_in_process(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    overrides = _base(tiny_overrides)
    cfg_path = _config_file(tmp_path, overrides)
    run_experiment(load_config(cfg_path), tmp_path / "local")
    with LocalDeployment(tmp_path / "deploy", num_supernodes=3, tls=True, auth=True) as fed:
        fed.run(cfg_path, tmp_path / "flower", timeout=600)
        assert all(p.poll() is None for p in fed.supernodes.values())
    _assert_same_run(tmp_path / "local", tmp_path / "flower")
    # replies carried only the trained tensors: the server accepts no extra key, and the bytes
    # of each reply are those of the client's layers, fewer for clients with fewer layers
    exp = prepare_experiment(load_config(cfg_path))
    for record in _records(tmp_path / "flower"):
        assert record["rejected"] == {}
        for c in record["clients"]:
            assert c["accepted"]
            keys = exp.adapted.trained_names(c["layers"], exp.train_head)
            assert c["bytes_up"] == payload_bytes({k: exp.adapted.parameter(k) for k in keys})
        sizes = {len(c["layers"]): c["bytes_up"] for c in record["clients"]}
        assert sizes[1] < sizes[2] < sizes[4]


FAULTY_APP = Path(__file__).with_name("flower_faults")


@needs_nginx
@on_deployment
def test_a_dead_supernode_and_a_malformed_reply_do_not_stop_a_secured_run(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    """SuperLink behind the proxy, TLS, node auth, partitions bound to keys; SuperNode 1 replies
    without its tensors, SuperNode 2 is killed after round 1. Round 2 is aggregated from client 0
    alone, and its global adapters equal an in-process aggregate of that accepted update."""
    overrides = _base(tiny_overrides, "flower.round_timeout=30", "flower.min_replies=1")  # 2 rounds
    cfg_path = _config_file(tmp_path, overrides)
    run_dir = tmp_path / "flower"
    with TestDeployment(
        tmp_path / "deploy", num_supernodes=3, app_dir=FAULTY_APP, node_config={1: "fault='malformed'"}
    ) as fed:
        assert fed.proxy and fed.auth and fed.partition_keys is not None
        out: dict[str, str] = {}
        runner = threading.Thread(target=lambda: out.update(log=fed.run(cfg_path, run_dir, timeout=600)))
        runner.start()
        _wait_for_round(run_dir, 1, timeout=300)
        fed.kill_supernode(2)
        runner.join(timeout=600)
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["rejected"] == {"1": "malformed reply: 'arrays' missing"}
    assert records[0]["missing"] == [] and records[1]["missing"] == [2]
    assert "no reply from clients [2]" in out["log"]

    # the same accepted updates in process: client 1's replies malformed, client 2 gone in round 2
    def faulty(exp: Experiment) -> TrainRound:
        def train_round(plan: RoundPlan, server: FederatedServer) -> list[ClientResult]:
            results = local_trainer(exp)(plan, server)
            results = [r for r in results if not (plan.round_number == 2 and r.update.client_id == 2)]
            return [
                rejected_result(1, "malformed reply: 'arrays' missing") if r.update.client_id == 1 else r
                for r in results
            ]

        return train_round

    run_federation(load_config(cfg_path), tmp_path / "local", faulty)
    _assert_same_run(tmp_path / "local", run_dir)


@needs_nginx
@on_deployment
def test_secure_aggregation_recovers_one_supernode_killed_after_its_masked_input_not_two(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    """Secure aggregation on a deployment (TLS, node auth). Round 1: SuperNode 2 sends its masked
    input and is killed when asked for its unmasking shares; its update is recovered from its
    neighbours' shares, so the round equals the in-process round with all three clients. Round 2:
    of the two left, SuperNode 1 goes the same way; client 0 alone cannot rebuild its seed (the
    threshold is 2), so the round is skipped and the adapters stay as round 1 left them."""
    overrides = _base(
        tiny_overrides,
        "flower.round_timeout=20",
        "flower.min_replies=1",
        "secure_aggregation.enabled=true",
        "secure_aggregation.neighbours=2",
        "secure_aggregation.threshold=2",
    )
    cfg_path = _config_file(tmp_path, overrides)
    run_dir = tmp_path / "flower"
    faults = {2: "fault='gone-after-input-1'", 1: "fault='gone-after-input-2'"}
    with TestDeployment(tmp_path / "deploy", num_supernodes=3, app_dir=FAULTY_APP, node_config=faults) as fed:
        fed.run(cfg_path, run_dir, timeout=600)
        assert fed.supernodes[2].poll() is not None and fed.supernodes[1].poll() is not None
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert [r["extras"]["secure_aggregation"].get("skipped") for r in records] == [None, 1]
    assert records[1]["metrics"]["test"] == records[0]["metrics"]["test"]
    one_round = _config_file(tmp_path, [*overrides, "federation.rounds=1"], "one-round.yaml")
    run_experiment(load_config(one_round), tmp_path / "local")
    _assert_same_run(tmp_path / "local", run_dir, rounds=1)


@needs_nginx
@on_deployment
def test_only_registered_supernodes_join_and_the_control_api_is_not_client_facing(tmp_path: Path) -> None:
    with LocalDeployment(tmp_path / "deploy", num_supernodes=2) as fed:
        nodes = _wait_for_nodes(fed, 2)
        # registering a key through the client-facing address (the proxy) is refused ...
        stranger, stranger_pub = make_supernode_keys(tmp_path / "stranger", "stranger")
        with pytest.raises(RuntimeError, match="supernode register"):
            fed.register(stranger_pub, connection="client-facing")
        # ... as is any Control API path there, while the Fleet API is forwarded
        assert _status(fed, "/v1/control/list-nodes") == 403
        assert _status(fed, "/v1/fleet/get-run") != 403
        # a SuperNode whose key was never registered does not get in
        fed.start_supernode(2, private_key=stranger, register=False)
        time.sleep(8)
        assert len(list_nodes(fed)) == 2
        # removing a node: unregistering its key takes it out of the federation
        gone = int(nodes[0]["node-id"])
        fed.unregister(gone)
        time.sleep(2)
        assert gone not in {int(n["node-id"]) for n in _online(fed)}
        assert len(_online(fed)) == 1


def list_nodes(fed: LocalDeployment) -> list[dict[str, Any]]:
    """`flwr supernode list` against the deployment: the registered SuperNodes (id, key, status)."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "supernode", "list", FEDERATION, "--format", "json"],
        env=fed.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=fed.work,
    ).stdout
    return list(json.loads(out[out.index("{") :]).get("nodes", []))


def _online(fed: LocalDeployment) -> list[dict[str, Any]]:
    return [n for n in list_nodes(fed) if str(n.get("status", "")).lower() == "online"]


def _wait_for_nodes(fed: LocalDeployment, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = _online(fed)
        if len(online) >= count:
            return online
        time.sleep(1)
    raise AssertionError(f"{count} SuperNodes did not come online: {list_nodes(fed)}")


def _status(fed: LocalDeployment, path: str) -> int:
    """The HTTP status the client-facing address gives a POST to `path`."""
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(fed.certs["ca"]))
    request = urllib.request.Request(f"https://{fed.fleet_address}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@on_deployment
def test_interrupted_flower_run_resumes_from_its_checkpoint(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    overrides = _base(tiny_overrides)  # 2 rounds: the first deployment dies after round 1
    cfg_path = _config_file(tmp_path, overrides)
    run_experiment(load_config(cfg_path), tmp_path / "local")
    run_dir = tmp_path / "flower"
    with LocalDeployment(tmp_path / "first", num_supernodes=3, tls=False, auth=False) as fed:
        runner = threading.Thread(target=lambda: _ignore_errors(fed.run, cfg_path, run_dir, timeout=600))
        runner.start()
        _wait_for_round(run_dir, 1, timeout=300)
    # every process of the first deployment is gone, the ServerApp with them
    runner.join(timeout=120)
    assert not (run_dir / "summary.json").exists()
    assert len(_records(run_dir)) == 1
    with LocalDeployment(tmp_path / "second", num_supernodes=3, tls=False, auth=False) as fed:
        fed.run(cfg_path, run_dir, resume=True, timeout=600)
    _assert_same_run(tmp_path / "local", run_dir)


def _ignore_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        fn(*args, **kwargs)
