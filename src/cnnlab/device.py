"""The one device rule: ``auto`` means CUDA when this machine has it, else the CPU; and
the CPU rule: torch threads and DataLoader workers from the cores that are free now
(``cpu_plan``), applied in one place (``use_threads``)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cnnlab.errors import CnnlabError

DEVICES = "auto | cpu | cuda | cuda:N"


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CnnlabError(f"device {name!r}: CUDA is not available on this machine")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise CnnlabError(f"device {name!r}: not a valid CUDA device name") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CnnlabError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
        return device
    raise CnnlabError(f"device {name!r}: choose {DEVICES}")


def free_memory(device: torch.device) -> int:
    """Bytes that ``device`` can still allocate: a GPU's free memory, or the memory Linux
    says is available (``MemAvailable``: free plus what the page cache gives back; the
    free pages where /proc/meminfo is missing)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------- the CPU rule

MAX_WORKERS = 4  # more loader processes than this feed no model we train faster


def cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy() -> float:
    """How many cores other work keeps busy: the 1-minute load average less this process's
    own share of it (``own_load``), at least 0."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    return max(0.0, load - own_load())


def own_load() -> float:
    """This process's estimated part of the 1-minute load average: its mean CPU use since
    it started, weighted as the kernel's exponential average weighs the last minute (a
    process 5 s old has added little yet; one that has run 2 threads for minutes, ~2)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
            age = float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return 0.0
    if age <= 0:
        return 0.0
    return time.process_time() / age * (1 - math.exp(-age / 60))


def free_cores(total: int | None = None, load: float | None = None) -> int:
    """Cores not kept busy by other work: ``total`` (default ``cores()``) minus the load
    average (default ``busy()``), rounded to the nearest whole core, at least 1."""
    total = cores() if total is None else total
    load = busy() if load is None else load
    return max(1, min(total, math.floor(total - load + 0.5)))


def choose_threads(free: int, processes: int = 1) -> int:
    """Torch threads per process: the free cores shared among ``processes``, at least 1.
    An OpenMP team larger than the free cores waits at every barrier for a thread the
    scheduler parked: two threads on two busy cores ran a ConvNet step 5x to 15x slower
    than one (benchmarks/threads.py)."""
    return max(1, free // max(1, processes))


def choose_workers(free: int, device_type: str = "cpu", threads: int = 1) -> int:
    """DataLoader worker processes. On the CPU the model's threads need the free cores, so
    loading stays in the training process (0) unless cores are left over beside
    ``threads``; on a GPU the cores feed the device: one per free core but the main one."""
    spare = free - threads if device_type == "cpu" else free - 1
    if device_type == "cpu" and spare < 2:  # a worker or two would only take turns
        return 0
    return max(0, min(MAX_WORKERS, spare))


@dataclass(frozen=True)
class CpuPlan:
    """What ``cpu_plan`` chose and why."""

    threads: int
    workers: int
    cores: int
    busy: float
    reason: str  # e.g. "2 cores, 0.8 busy" or "--threads 2, 2 cores, 0.8 busy"

    def describe(self) -> str:
        """``1 thread, 0 workers (2 cores, 0.8 busy)``."""
        thread = f"{self.threads} thread{'s' * (self.threads != 1)}"
        worker = f"{self.workers} worker{'s' * (self.workers != 1)}"
        return f"{thread}, {worker} ({self.reason})"


def cpu_plan(
    threads: int | None = None,
    workers: int | None = None,
    device_type: str = "cpu",
    processes: int = 1,
    total: int | None = None,
    load: float | None = None,
) -> CpuPlan:
    """Threads and workers for a job on ``device_type``: a value given (not None) wins,
    then ``OMP_NUM_THREADS`` for threads, else the rule (``choose_threads``,
    ``choose_workers``) over the cores free now. ``total`` and ``load`` stand in for
    ``cores()`` and ``busy()`` (tests)."""
    total = cores() if total is None else total
    load = busy() if load is None else load
    free = free_cores(total, load)
    given = []
    if threads is not None:
        given.append(f"--threads {threads}")
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]):
        threads = int(os.environ["OMP_NUM_THREADS"])
        given.append(f"OMP_NUM_THREADS={threads}")
    else:
        threads = choose_threads(free, processes)
    if workers is not None:
        given.append(f"--workers {workers}")
    else:
        workers = choose_workers(free, device_type, threads)
    reason = ", ".join([*given, f"{total} core{'s' * (total != 1)}", f"{load:.1f} busy"])
    return CpuPlan(threads, workers, total, load, reason)


def use_threads(threads: int) -> int:
    """Set torch's intra-op thread count and return the previous one: the one place cnnlab
    sets it (ONNX Runtime sessions take torch's count)."""
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    return previous


@contextmanager
def threads_for(threads: int) -> Iterator[None]:
    """``use_threads(threads)`` inside the block, the previous count after it (a library
    call such as ``train`` leaves its caller's setting as it found it)."""
    previous = use_threads(threads)
    try:
        yield
    finally:
        use_threads(previous)
