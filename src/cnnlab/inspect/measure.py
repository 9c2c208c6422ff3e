"""The measured memory of real training steps on the CPU, to check ``memory.py`` against.

``measure_training_steps(cases, batches)`` starts a fresh Python process that warms torch
up (a small network's forward, backward and AdamW step, so that code, thread pools and
oneDNN are loaded); for each model it reads its resident memory as the baseline, builds
the model (what that adds is the weights), then for each batch size resets the kernel's
high-water mark of resident memory (``/proc/self/clear_refs``) and runs two real steps
with a new optimiser (the second with the optimiser's state, as every later step has it).
A step's peak is the weights plus ``VmHWM`` above the resident memory before it:
everything the process touched, whoever allocated it (torch's allocator, oneDNN, the
kernels' own buffers). Large blocks go straight to ``mmap`` (``MALLOC_MMAP_THRESHOLD_``),
so memory freed is given back at once and the high-water mark is the true peak, not the
allocator's reuse pattern.

``python -m cnnlab.inspect.measure`` prints the table of estimated against measured that
docs/flops_and_memory.md shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cnnlab.errors import CnnlabError

# Small inputs keep the check fast: convnet at its natural 1x28x28, VGG-11 at its minimum
# (its weights, gradients and AdamW state, 2.1 GB, are those of 224x224), ResNet-18 and
# DenseNet-121 at 64x64, where their activations still outweigh or match the weights.
CASES = (
    ("convnet", (1, 28, 28)),
    ("resnet18", (3, 64, 64)),
    ("vgg11", (3, 32, 32)),
    ("densenet121", (3, 64, 64)),
)
BATCHES = (1, 8, 32)
_CHILD = "CNNLAB_MEASURING"  # set in the measuring process


def measure_training_steps(
    cases: tuple[tuple[str, tuple[int, int, int]], ...] = CASES,
    batches: tuple[int, ...] = BATCHES,
    optimizer: str = "adamw",
) -> dict[str, list[int]]:
    """Bytes per model and batch size: the peak resident memory of two real training steps
    (weights included) above the baseline of one fresh process (see the module doc)."""
    if os.environ.get(_CHILD):
        raise CnnlabError("a measuring process does not start another")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", _CHILD: "1"}
    job = json.dumps({"cases": cases, "batches": batches, "optimizer": optimizer})
    command = [sys.executable, "-m", "cnnlab.inspect.measure", "--child", job]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise CnnlabError(f"measuring failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise CnnlabError(f"/proc/self/status has no {field}")


def _child(job: dict) -> None:
    import gc

    import torch
    from torch import nn

    from cnnlab.inspect.memory import make_optimizer, training_loss
    from cnnlab.inspect.specs import build_model

    torch.set_num_threads(1)
    optimizer = job["optimizer"]
    warm = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip
    warm_opt = make_optimizer(optimizer, list(warm.parameters()))
    for _ in range(2):
        training_loss(warm(torch.randn(2, 3, 16, 16))).backward()
        warm_opt.step()
        warm_opt.zero_grad()
    del warm, warm_opt
    found = {}
    for spec, size in job["cases"]:
        gc.collect()
        baseline = _status("VmRSS:")
        model, size = build_model(spec, None, tuple(size))
        model.train()
        weights = _status("VmRSS:") - baseline
        peaks = found[spec] = []
        for batch in job["batches"]:
            gc.collect()
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # the high-water mark starts again from what is resident now
            before = _status("VmRSS:")
            x = torch.randn(batch, *size)
            opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
            for _ in range(2):
                training_loss(model(x)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            peaks.append(weights + _status("VmHWM:") - before)
            del x, opt
        del model
    print(json.dumps(found))


def table() -> list[dict[str, object]]:
    """Estimated and measured training-step memory (AdamW) of ``CASES`` at ``BATCHES``."""
    import torch

    from cnnlab.inspect.memory import estimate_memory
    from cnnlab.inspect.specs import build_model

    rows = []
    measured_peaks = measure_training_steps(CASES, BATCHES)
    for spec, size in CASES:
        with torch.device("meta"):
            model, _ = build_model(spec, None, size)
        for batch, measured in zip(BATCHES, measured_peaks[spec], strict=True):
            estimate = estimate_memory(model, size, batch).training_step
            rows.append(
                {
                    "model": spec,
                    "input": list(size),
                    "batch": batch,
                    "estimated": estimate,
                    "measured": measured,
                    "error": estimate / measured - 1,
                }
            )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # the measuring process itself: never starts another
        _child(json.loads(sys.argv[2]))
    elif os.environ.get(_CHILD) or len(sys.argv) > 1:
        sys.exit("usage: python -m cnnlab.inspect.measure (prints the table)")
    else:
        print("| model | input | batch | estimated MB | measured MB | error |")
        print("|---|---|---:|---:|---:|---:|")
        for row in table():
            print(
                f"| {row['model']} | {'x'.join(map(str, row['input']))} | {row['batch']} |"
                f" {row['estimated'] / 1e6:,.1f} | {row['measured'] / 1e6:,.1f} |"
                f" {row['error']:+.1%} |"
            )
