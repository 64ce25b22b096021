"""Test scaffolding for Flower deployments: `fedhello.deploy.federation.LocalDeployment` plus fault injection."""

from __future__ import annotations

import contextlib

import psutil

from fedhello.deploy.federation import LocalDeployment


class TestDeployment(LocalDeployment):
    """A LocalDeployment whose SuperNodes the tests can kill."""

    __test__ = False  # a helper, not a test class for pytest to collect

    def kill_supernode(self, partition: int) -> None:
        """Kill a SuperNode and its ClientApp processes at once, as a crashed machine would stop."""
        root = psutil.Process(self.supernodes[partition].pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        self.supernodes[partition].wait(timeout=10)
