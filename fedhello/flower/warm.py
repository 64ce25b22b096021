"""Warm ClientApp processes for Flower deployments: imports paid once per SuperNode, not per message.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process, started by the SuperNode's
SuperExec (`flower-superexec`). A fresh process imports torch, transformers, peft and fedhello
before it trains: about 4 s of every round on a 2-core machine, more than the training itself
(docs/flower.md, "Cost"). This module is a drop-in `flower-superexec`: it runs Flower's own
SuperExec loop, unchanged, with one executor swapped. ClientApps are forked from a fork server
(Python's `multiprocessing` "forkserver") that imported those libraries once at start-up; each
message still gets its own process, which runs Flower's own `flwr-clientapp` entry point with
the same arguments. Other task types launch as before.

    python -m fedhello.flower.warm ARGS...      # the arguments flower-superexec takes

`LocalDeployment` (fedhello/deploy/federation.py) puts it on the SuperNodes' PATH as `flower-superexec`;
on a real client machine start the SuperNode with `--isolation process` and run this module
with the arguments `flower-superexec` would get (docs/flower.md).

It relies on the executor interface of flwr 1.42 (`flwr.supercore.superexec.executor`), which is
why the install pins that version.
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.supercore.superexec.executor import Executor

# what every ClientApp imports, imported once by the fork server
PRELOAD = ["torch", "transformers", "peft", "fedhello.flower.client_app", "flwr.supernode.cli.flwr_clientapp"]


def _run_clientapp(argv: list[str]) -> None:
    """In a forked process: Flower's `flwr-clientapp` entry point with these arguments."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = ["flwr-clientapp", *argv]
    flwr_clientapp()


def make_executor() -> Executor:
    """A SubprocessExecutor whose ClientApps are forked from a warm fork server."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)

    class ForkServerExecutor(SubprocessExecutor):
        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            argv = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address]
            argv += ["--token", spec.token]
            if spec.insecure:
                argv.append("--insecure")
            elif spec.root_certificates_path is not None:
                argv += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                argv += ["--parent-pid", str(spec.parent_pid)]
            if spec.runtime_dependency_install:
                argv.append("--allow-runtime-dependency-installation")
            context.Process(target=_run_clientapp, args=(argv,), daemon=False).start()
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            multiprocessing.active_children()  # reaps finished ClientApps

    executor = ForkServerExecutor()
    # start the fork server (and its imports) now, not at the first message
    context.Process(target=_noop).start()
    return executor


def _noop() -> None:
    return None


def main() -> None:
    """`flower-superexec` with warm ClientApps."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec

    executor = make_executor()
    superexec.get_executor = lambda *args, **kwargs: executor
    flower_superexec()


if __name__ == "__main__":
    main()
