"""Multi-node launch as README's "Several nodes" section writes it: one torchrun agent per node, meeting
through a c10d rendezvous (or the static one, where each node gives its --node_rank). Here two agents on
127.0.0.1 with one process each stand for two nodes, and must train as one agent with two processes does
(gloo on CPU, FSDP2, the demo sample, 2 epochs). Measured: the losses and weights are bit-identical."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import REPO, demo_config, metrics, scaled_timeout, subprocess_env, torchrun, weights

KEYS = dict(num_epochs=2, epochs_per_stage=1, max_latent_stage=2, batch_size_training=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous(backend: str, port: int, node_rank: int) -> list[str]:
    if backend == "c10d":  # ranks are handed out at the rendezvous
        return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode-test"]
    return ["--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def node_agents(config: Path, backend: str, nnodes: int = 2) -> list[subprocess.CompletedProcess]:
    """nnodes `torchrun --nnodes N --nproc_per_node 1 ... run.py CONFIG` at once, as on nnodes machines."""
    port = free_port()
    commands = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(nnodes),
            "--nproc_per_node",
            "1",
            *rendezvous(backend, port, node_rank),
            str(REPO / "run.py"),
            str(config),
        ]
        for node_rank in range(nnodes)
    ]
    agents = [
        subprocess.Popen(
            command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command in commands
    ]
    try:
        outputs = [agent.communicate(timeout=scaled_timeout(600)) for agent in agents]
    finally:
        for agent in agents:  # only after a failure: SIGTERM, which torchrun forwards to its worker
            if agent.poll() is None:
                agent.terminate()
                agent.communicate(timeout=scaled_timeout(60))
    return [
        subprocess.CompletedProcess(command, agent.returncode, out, err)
        for command, agent, (out, err) in zip(commands, agents, outputs)
    ]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, tiny_model_dir) -> Path:
    """The reference: one agent, two processes."""
    tmp = tmp_path_factory.mktemp("one_node")
    result = torchrun(demo_config(tmp, tiny_model_dir, name="one_node", **KEYS), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "checkpoints" / "one_node"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_two_single_process_nodes_train_as_one_node_with_two_processes(tmp_path, tiny_model_dir, one_node, backend):
    agents = node_agents(demo_config(tmp_path, tiny_model_dir, name="two_nodes", **KEYS), backend)
    for agent in agents:
        assert agent.returncode == 0, agent.stdout[-2000:] + agent.stderr[-3000:]
    # each agent prints its own worker's output, and only rank 0 reports: the ranks were on different agents
    assert sorted(agent.stdout.count("[eval] ") for agent in agents) == [0, 2]

    two_nodes = tmp_path / "checkpoints" / "two_nodes"
    a, b = metrics(one_node), metrics(two_nodes)
    assert [m["stage"] for m in a] == [m["stage"] for m in b] == [0, 1]
    for ma, mb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert abs(ma[key] - mb[key]) <= 1e-6 * abs(ma[key]), (key, ma, mb)
        assert (ma["accuracy"], ma["total"]) == (mb["accuracy"], mb["total"])
    wa, wb = weights(one_node / "checkpoint_2"), weights(two_nodes / "checkpoint_2")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=k)
