"""Attribution speed on ResNet-18 at 224x224, one thread: each ``cnnlab explain`` method's
milliseconds per image as a ratio to one forward+backward pass measured in the same
process, interleaved with it, and its peak memory; then Grad-CAM from the three libraries
side by side on the same model and image: torchcam's (what cnnlab uses), Captum's
LayerGradCam and pytorch-grad-cam's GradCAM, and Grad-CAM++ from the two that have it,
their speed and how closely their maps agree.

    python benchmarks/explain.py [--methods gradcam scorecam ...] [--repeats 5]
                                 [--slow-repeats 1] [--size 224] [--format json]

Each method is measured in a child process of its own, so that its peak memory (the
process's maximum resident set above what it held before the method's first call; torch's
CPU allocator is invisible to tracemalloc) is its own and not an earlier method's.
Score-CAM, Integrated Gradients and occlusion take seconds an image: they are timed
``--slow-repeats`` times after the first call (0: the first call is the time).

pytorch-grad-cam (``grad-cam`` on PyPI) is not a cnnlab dependency: it requires
opencv-python-headless, a second OpenCV that would overwrite the cv2 of the
opencv-contrib-python-headless cnnlab needs. To compare with it, install it apart, without
its dependencies, and put it on the path of this script only:

    pip install --no-deps --target /tmp/gradcam grad-cam ttach
    PYTHONPATH=/tmp/gradcam python benchmarks/explain.py --methods gradcam

It then runs on the cv2 that is there. Without it its row says it was skipped.

Targets: Grad-CAM <= 1.5x a forward+backward pass. torchcam's own table (6-core laptop):
Grad-CAM 40.7 ms, Score-CAM 6,797 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnlab.attribution import METHODS
from cnnlab.attribution.maps import ScalarModel, attribute, class_score
from cnnlab.models.factory import create_model

SLOW = ("scorecam", "ig", "occlusion")
FORWARD_BACKWARD = "fwd+bwd"
CLASS = 3


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(first: Callable[[], object], second: Callable[[], object], repeats: int):
    """Median milliseconds of each, alternating which runs first every round."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(repeats):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            (first, second)[which]()
            times[which].append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def setup(size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).eval()
    return model, torch.randn(1, 3, size, size)


def forward_backward_of(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x.detach().requires_grad_())[0, CLASS].backward()

    return forward_backward


def measure_method(method: str, size: int, repeats: int) -> dict:
    """One method's row, in this (child) process."""
    model, x = setup(size)
    with torch.no_grad():
        model(x)  # the first call's one-time costs are nobody's peak

    def explain() -> torch.Tensor:
        return attribute(model, x, class_score(CLASS), method, "layer4")

    before = current_rss_mb()
    start = time.perf_counter()
    explain()
    first_ms = (time.perf_counter() - start) * 1000
    peak = peak_rss_mb() - before
    if repeats:
        base, ms = interleaved(forward_backward_of(model, x), explain, repeats)
    else:  # the first call is the time (a slow method on a busy machine)
        forward_backward = forward_backward_of(model, x)
        base, ms = interleaved(forward_backward, forward_backward, 2)[0], first_ms
    return {
        "name": method,
        "ms": round(ms, 1),
        "forward_backward_ms": round(base, 1),
        "ratio": round(ms / base, 2),
        "first_call_ms": round(first_ms, 1),
        "peak_mb": round(max(peak, 0.0), 1),
        "repeats": repeats,
    }


def measure_forward_backward(size: int, repeats: int) -> dict:
    """The forward+backward pass's own row (its peak memory measured before anything else
    has raised the process's high-water mark)."""
    model, x = setup(size)
    with torch.no_grad():
        model(x)
    forward_backward = forward_backward_of(model, x)
    before = current_rss_mb()
    forward_backward()
    peak = peak_rss_mb() - before
    base, _ = interleaved(forward_backward, forward_backward, repeats)
    return {
        "name": FORWARD_BACKWARD,
        "ms": round(base, 1),
        "forward_backward_ms": round(base, 1),
        "ratio": 1.0,
        "peak_mb": round(max(peak, 0.0), 1),
        "repeats": repeats,
    }


def libraries(size: int, repeats: int) -> list[dict]:
    """Grad-CAM and Grad-CAM++ of class CLASS at layer4 from torchcam, Captum (Grad-CAM
    only: it has no Grad-CAM++) and pytorch-grad-cam, each map at the input's size,
    compared with cnnlab's map of the same method (torchcam's Grad-CAM; its own
    Grad-CAM++). The largest difference is taken with both maps scaled to [0, 1]."""
    from captum.attr import LayerGradCam

    model, x = setup(size)
    scalar = ScalarModel(model, class_score(CLASS)).eval()

    def cnnlab(method: str) -> Callable[[], torch.Tensor]:
        return lambda: attribute(model, x, class_score(CLASS), method, "layer4")[0]

    def captum() -> torch.Tensor:
        cam = LayerGradCam(scalar, model.layer4).attribute(
            x.detach().requires_grad_(), target=0, relu_attributions=True
        )
        cam = F.interpolate(cam.detach(), x.shape[-2:], mode="bilinear")[0, 0]
        return cam / cam.max().clamp_min(1e-12)

    def torchcam_plus_plus() -> torch.Tensor:
        from torchcam.methods import GradCAMpp

        with GradCAMpp(scalar, target_layer=model.layer4) as extractor:
            scores = scalar(x.detach().requires_grad_())
            cam = extractor(class_idx=0, scores=scores, normalized=False)[0]
        cam = F.interpolate(cam[:, None], x.shape[-2:], mode="bilinear")[0, 0].clamp_min(0)
        return cam / cam.max().clamp_min(1e-30)

    candidates: list[tuple[str, str, Callable[[], torch.Tensor] | None]] = [
        ("gradcam", "torchcam (cnnlab)", cnnlab("gradcam")),
        ("gradcam", "captum LayerGradCam", captum),
    ]
    skipped = ""
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def grad_cam_library(kind: type) -> Callable[[], torch.Tensor]:
            def explain() -> torch.Tensor:
                with kind(model=scalar, target_layers=[model.layer4]) as cam:
                    found = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)])
                return torch.from_numpy(found[0]).float()

            return explain

        plus_plus = grad_cam_library(GradCAMPlusPlus)
        grad_cam = grad_cam_library(GradCAM)
    except ImportError as error:
        skipped = f"skipped: pytorch-grad-cam is not importable ({error}); see the docstring"
        plus_plus = grad_cam = None
    candidates += [
        ("gradcam", "pytorch-grad-cam", grad_cam),
        ("gradcam++", "cnnlab (by hand)", cnnlab("gradcam++")),
        ("gradcam++", "torchcam GradCAMpp", torchcam_plus_plus),
        ("gradcam++", "pytorch-grad-cam", plus_plus),
    ]
    forward_backward = forward_backward_of(model, x)
    forward_backward()
    references = {method: cnnlab(method)() for method in ("gradcam", "gradcam++")}
    rows = []
    for method, name, function in candidates:
        if function is None:
            rows.append({"method": method, "name": name, "skipped": skipped})
            continue
        found, reference = function(), references[method]
        base, ms = interleaved(forward_backward, function, repeats)
        rows.append(
            {
                "method": method,
                "name": name,
                "ms": round(ms, 1),
                "forward_backward_ms": round(base, 1),
                "ratio": round(ms / base, 2),
                "pearson_with_cnnlab": round(pearson(found, reference), 4),
                "spearman_with_cnnlab": round(spearman(found, reference), 4),
                "max_difference_from_cnnlab": round(
                    float((min_max(found) - min_max(reference)).abs().max()), 4
                ),
            }
        )
    return rows


def min_max(a: torch.Tensor) -> torch.Tensor:
    """Scaled to [0, 1] (pytorch-grad-cam subtracts the minimum, the others do not)."""
    return (a - a.min()) / (a.max() - a.min()).clamp_min(1e-30)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-repeats", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--child", choices=[FORWARD_BACKWARD, *METHODS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == FORWARD_BACKWARD:
        print(json.dumps(measure_forward_backward(args.size, args.repeats)))
        return
    if args.child:
        repeats = args.slow_repeats if args.child in SLOW else args.repeats
        print(json.dumps(measure_method(args.child, args.size, repeats)))
        return
    rows = []
    for method in [FORWARD_BACKWARD, *args.methods]:
        command = [sys.executable, __file__, "--child", method, "--size", str(args.size)]
        command += ["--repeats", str(args.repeats), "--slow-repeats", str(args.slow_repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.splitlines()[-1]))
    compared = libraries(args.size, args.repeats)
    load = os.getloadavg()
    if args.format == "json":
        print(json.dumps({"load_average": load, "methods": rows, "libraries": compared}, indent=2))
        return
    print(
        f"ResNet-18 at {args.size}x{args.size}, 1 thread, median of {args.repeats} "
        f"({args.slow_repeats} for {', '.join(SLOW)}); load average "
        + " ".join(f"{v:.2f}" for v in load)
    )
    print("(ratio: to the forward+backward pass timed beside it in the same process)")
    print(f"{'method':<12}{'ms':>10}{'fwd+bwd ms':>12}{'ratio':>8}{'peak MB':>9}")
    for row in rows:
        print(
            f"{row['name']:<12}{row['ms']:>10.1f}{row['forward_backward_ms']:>12.1f}"
            f"{row['ratio']:>8.2f}{row['peak_mb']:>9.1f}"
        )
    print("The libraries, same model and image (maps compared with cnnlab's of the method):")
    print(
        f"{'method':<10}{'library':<21}{'ms':>8}{'ratio':>7}{'pearson':>9}{'spearman':>9}"
        f"{'max diff':>9}"
    )
    for row in compared:
        if "skipped" in row:
            print(f"{row['method']:<10}{row['name']:<21}{row['skipped']}")
            continue
        print(
            f"{row['method']:<10}{row['name']:<21}{row['ms']:>8.1f}{row['ratio']:>7.2f}"
            f"{row['pearson_with_cnnlab']:>9.4f}{row['spearman_with_cnnlab']:>9.4f}"
            f"{row['max_difference_from_cnnlab']:>9.4f}"
        )


if __name__ == "__main__":
    main()
