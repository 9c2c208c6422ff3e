"""Two machines on this one: two network namespaces joined by a veth pair, each with its
own host name (a UTS namespace) and a hosts file naming both, one torchrun node in each.
The commands are docs/distributed.md's own (docs/training.md shows the same): 2 nodes x 1
process train exactly as 1 node x 2 processes, and under ``--max-restarts 1`` a worker
killed mid-epoch is restarted with the whole group, which resumes from last.pt and ends
with the metrics of the uninterrupted run. The namespaces hold only test addresses
(10.213.0.0/30), are named with a random suffix and are deleted however the tests end."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab import checkpoint
from cnnlab.data.digits import write_digits
from cnnlab.engine import loop
from cnnlab.engine.progress import unwrapped
from cnnlab.errors import CnnlabError
from cnnlab.files import read_yaml, write_yaml
from cnnlab.training import train
from tests.conftest import read_metrics, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _bench  # its stop_processes, which the busy loops of benchmarks stop with too

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs" / "distributed.md"
HOSTS = {"host0": "10.213.0.1", "host1": "10.213.0.2"}  # node i is host{i}
EPOCHS = 2  # the kill test: killed in epoch 2, resumed after epoch 1
# The docs' placeholders, and the tiny training that stands in for resnet50 on the dogs.
DATA, MODEL = "data/dogs", "resnet50"
TINY = (
    *("--img-size", "16", "--cdims", "8,16", "--hdims", "32,", "--no-flip"),
    *("--epochs", str(EPOCHS), "--batch-size", "32", "--threads", "1", "--workers", "0"),
)


def _shown_commands(text: str) -> list[str]:
    """The torchrun commands of the ```sh blocks in ``text``, continuation lines joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.split("#")[0]).strip()
            if re.match(r"([A-Z_]+=\S* )*torchrun ", line):
                commands.append(line)
    return commands


def _the_command(having: str) -> list[str]:
    found = [c for c in _shown_commands(DOCS.read_text()) if having in c]
    assert len(found) == 1, f"{DOCS} should show one torchrun command with {having!r}"
    return shlex.split(found[0])


def _ours(shown: list[str], data: Path, out: Path, nproc: int, node_rank: int = 0) -> list[str]:
    """``shown`` as these tests run it: this Python's torchrun, the tiny data, model and run
    folder, ``nproc`` processes, this node's rank and ``host0`` for HOST0."""
    values = {"--nproc_per_node": str(nproc), "--node_rank": str(node_rank), "--model": "convnet"}
    command: list[str] = []
    for token in shown:
        if command and command[-1] in values:
            assert token in ("8", "4", "0", MODEL), f"unexpected {command[-1]} {token}"
            token = values[command[-1]]
        elif token == "torchrun":
            command += [sys.executable, "-m", "torch.distributed.run"]
            continue
        elif not command and "=" in token:  # NAME=value before the command: its environment
            command.append("env")
        elif token == DATA:
            token = str(data)
        elif token.startswith("runs/"):
            token = str(out)
        command.append(token.replace("HOST0", "host0"))
    assert str(data) in command and str(out) in command, shown
    return [*command, *TINY]


class Machines:
    """Two network namespaces that stand in for host0 and host1."""

    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.namespaces = [f"cnlab-{suffix}-{i}" for i in range(2)]
        self.veths = [f"cnl{suffix}v{i}" for i in range(2)]  # at most 15 characters

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def create(self) -> None:
        for name in self.namespaces:
            self._ip("netns", "add", name)
            # `ip netns exec` shows this file as the namespace's /etc/hosts.
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True)
            names = "".join(f"{address} {host}\n" for host, address in HOSTS.items())
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
        self._ip("link", "add", self.veths[0], "type", "veth", "peer", "name", self.veths[1])
        addresses = HOSTS.values()
        for namespace, veth, address in zip(self.namespaces, self.veths, addresses, strict=True):
            self._ip("link", "set", veth, "netns", namespace)
            self._ip("-n", namespace, "addr", "add", f"{address}/30", "dev", veth)
            self._ip("-n", namespace, "link", "set", veth, "up")
            self._ip("-n", namespace, "link", "set", "lo", "up")

    def delete(self) -> None:
        """Remove whatever ``create`` made (deleting a namespace deletes its veth end, and
        the pair goes with it), also after a failure half-way."""
        for namespace, veth in zip(self.namespaces, self.veths, strict=True):
            subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)

    def start(self, node: int, command: list[str], logs: Path) -> subprocess.Popen:
        """``command`` on host{node}: in its network namespace, under its host name, its
        output in ``logs``/host{node}.out and .err (files: a pipe nobody reads while it runs
        could fill and stall it). Each program execs the next, so the process is torchrun."""
        named = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', f"host{node}"]
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"host{node}.out", "w") as out, open(logs / f"host{node}.err", "w") as err:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.namespaces[node], *named, *command],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                cwd=ROOT,
                stdout=out,
                stderr=err,
            )


@pytest.fixture(scope="module")
def machines() -> Iterator[Machines]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("two machines need root, `ip` (iproute2) and `unshare` (util-linux)")
    made = Machines()
    try:
        made.create()
    except subprocess.CalledProcessError as error:
        made.delete()
        if "netns" in error.cmd and "add" in error.cmd:
            pytest.skip(f"`ip netns add` is refused here: {error.stderr.strip()}")
        raise
    try:
        yield made
    finally:
        made.delete()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 digits of each class at 16 px: about 20 optimizer steps per epoch."""
    root = tmp_path_factory.mktemp("cluster") / "digits"
    write_digits(root, size=16)
    for folder in root.iterdir():
        for extra in sorted(folder.iterdir())[60:]:
            extra.unlink()
    return root


def _finish(nodes: list[subprocess.Popen], logs: Path, timeout: float = 240) -> list[str]:
    """Each node's stderr once all have ended, each checked to have succeeded; a node that
    fails ends the others at once (they would wait for it until torchrun's timeouts)."""
    deadline = time.monotonic() + timeout
    try:
        while any(node.poll() is None for node in nodes):
            if any(node.poll() for node in nodes) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        _stop(nodes)
    # Messages wrapped to 80 columns are joined again, so a phrase is found whole.
    said = [unwrapped((logs / f"host{n}.err").read_text()) for n in range(len(nodes))]
    for node, err in zip(nodes, said, strict=True):
        assert node.returncode == 0, err[-3000:]
    return said


def _stop(nodes: list[subprocess.Popen]) -> None:
    """End the nodes still running: SIGTERM first, which torchrun passes on to its workers
    (they run in sessions of their own, so a SIGKILLed torchrun would leave them behind)."""
    _bench.stop_processes(nodes, timeout=30)


def _printed(logs: Path, node: int) -> str:
    return (logs / f"host{node}.out").read_text()


@pytest.fixture(scope="module")
def one_node_two_processes(
    machines: Machines, digits: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The uninterrupted run that the others must equal, trained on host0 alone."""
    folder = tmp_path_factory.mktemp("one-node")
    run, logs = folder / "run", folder / "logs"
    single = _ours(
        _the_command("--nproc_per_node 4 -m cnnlab train data/dogs"), digits, run, nproc=2
    )
    said = _finish([machines.start(0, single, logs)], logs)
    assert "2 processes on cpu" in said[0]
    return run


def _same_training(run: Path, reference: Path) -> None:
    """The same metrics, report and best weights, to the last bit."""
    assert read_metrics(run, timed=False) == read_metrics(reference, timed=False)
    weights, expected = (load_file(r / "best.safetensors") for r in (run, reference))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)
    report = json.loads((run / "report.json").read_text())
    assert report == json.loads((reference / "report.json").read_text())


def test_two_machines_train_as_one_machine_with_two_processes(
    machines: Machines, digits: Path, one_node_two_processes: Path, tmp_path: Path
) -> None:
    run, logs = tmp_path / "run", tmp_path / "logs"
    shown = _the_command("--master_addr")
    said = _finish(
        [machines.start(n, _ours(shown, digits, run, 1, node_rank=n), logs) for n in (0, 1)],
        logs,
    )
    _same_training(run, one_node_two_processes)
    assert "2 processes on cpu" in said[0]
    # Rank 0 (--node_rank 0) alone reports.
    assert "test top-1" in _printed(logs, 0) and _printed(logs, 1) == ""
    # ... and writes no epoch rows (each starts "1/2", "2/2").
    assert re.search(rf"^1/{EPOCHS}\s", said[0], re.M) and not re.search(
        r"^\d+/\d+\s", said[1], re.M
    )
    print(f"\n2 nodes x 1 process = 1 node x 2 processes: {read_metrics(run, timed=False)}")


def _workers(torchrun: subprocess.Popen) -> list[int]:
    """The cnnlab processes that a torchrun agent runs now."""
    pid = torchrun.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"cnnlab" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_worker_killed_mid_epoch_restarts_and_resumes_to_the_same_metrics(
    machines: Machines, digits: Path, one_node_two_processes: Path, tmp_path: Path
) -> None:
    run, logs = tmp_path / "run", tmp_path / "logs"
    shown = _the_command("--max-restarts 1")
    nodes = [machines.start(n, _ours(shown, digits, run, 1), logs) for n in (0, 1)]
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.csv").is_file() and read_metrics(run)):
            assert all(node.poll() is None for node in nodes), "a node ended before epoch 1"
            assert time.monotonic() < deadline, "no epoch finished within 180 s"
            time.sleep(0.01)
        # Into epoch 2 by a third of epoch 1's time: no epoch can finish without host1.
        time.sleep(float(read_metrics(run)[0]["seconds"]) / 3)
        (killed,) = _workers(nodes[1])
        os.kill(killed, signal.SIGKILL)
        assert checkpoint.load_state(run / "last.pt")["epoch"] == 1
    except BaseException:
        _stop(nodes)
        raise
    said = "".join(_finish(nodes, logs))
    assert sum("test top-1" in _printed(logs, n) for n in (0, 1)) == 1  # one report
    # The group's new rank 0 (on either node) took up the run where last.pt left it.
    assert said.count(f"resuming {run} after epoch 1 of {EPOCHS}") == 1, said[-3000:]
    # Nothing lost, nothing twice: every epoch once, then the uninterrupted run's metrics.
    assert [int(row["epoch"]) for row in read_metrics(run)] == list(range(1, EPOCHS + 1))
    _same_training(run, one_node_two_processes)
    print(f"\nkilled in epoch 2, restarted, resumed: {read_metrics(run, timed=False)}")


def test_the_training_guide_shows_the_tested_two_machine_commands() -> None:
    shown = _shown_commands((ROOT / "docs" / "training.md").read_text())
    readme = [c for c in shown if "--nnodes" in c or DATA in c]
    assert readme, "docs/training.md should show torchrun on two machines"
    assert set(readme) <= set(_shown_commands(DOCS.read_text()))


def test_only_the_same_torchrun_job_with_the_same_settings_resumes_by_itself(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(few_digits, run, epochs=1)
    train(cfg)
    saved = read_yaml(run / "config.yaml")

    def started_by(job: str) -> None:  # what a torchrun job's fresh run records
        write_yaml(
            run / "config.yaml", {**saved, "resolved": {**saved["resolved"], "torchrun_job": job}}
        )

    def resumes(job: str, restarts: int = 0, **changes: object) -> bool:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restarts))
        return loop._restarted_job(replace(cfg, **changes), run, few_digits)

    assert not resumes("job-a")  # a run outside torchrun records no job
    started_by("job-a")
    assert not resumes("job-a")  # not launched by torchrun as one of several
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resumes("job-a") and resumes("job-a", restarts=1)
    assert resumes("job-a", threads=3, quiet=False)  # what a resume may change anyway
    assert not resumes("job-b", restarts=1)  # another job's run
    assert not resumes("job-a", epochs=2) and not resumes("job-a", lr=1e-2)  # other settings
    started_by("none")  # torchrun's static rendezvous names no job: a restart tells
    assert not resumes("none") and resumes("none", restarts=1)

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(CnnlabError, match="already holds a run"):
        train(cfg)  # refused as before, and left as it was
    assert read_yaml(run / "config.yaml")["resolved"]["torchrun_job"] == "none"
