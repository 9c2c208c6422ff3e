"""Attribution speed on ResNet-18 at 224x224, one thread: each ``cnnlab explain`` method's
milliseconds per image as a ratio to one forward+backward pass measured in the same run,
its peak memory (tracemalloc does not see torch's allocator, so the process's maximum
resident set growth is given), and the two libraries' Grad-CAM side by side (torchcam's,
which cnnlab uses, and Captum's LayerGradCam): their speed and how far their maps differ.

    python benchmarks/explain.py [--methods gradcam scorecam ...] [--repeats 5] [--size 224]

Targets: Grad-CAM <= 1.5x a forward+backward pass. torchcam's own table (6-core laptop):
Grad-CAM 40.7 ms, Score-CAM 6,797 ms.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from cnnlab.attribution import METHODS
from cnnlab.attribution.maps import ScalarModel, attribute, class_score
from cnnlab.models.factory import create_model


def timed(function, repeats: int) -> float:
    """Median milliseconds of ``function()`` after one warm-up call."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)

    def forward_backward() -> None:
        model.zero_grad()
        model(x.requires_grad_())[0, 3].backward()

    base = timed(forward_backward, args.repeats)
    rows = [{"name": "forward+backward", "ms": round(base, 2), "ratio": 1.0}]
    for method in args.methods:
        before = rss_mb()
        repeats = args.repeats if method not in ("scorecam", "occlusion", "ig") else 1
        ms = timed(lambda m=method: attribute(model, x, class_score(3), m, "layer4"), repeats)
        rows.append(
            {
                "name": method,
                "ms": round(ms, 2),
                "ratio": round(ms / base, 2),
                "peak_rss_growth_mb": round(rss_mb() - before, 1),
            }
        )

    from captum.attr import LayerGradCam

    scalar = ScalarModel(model, class_score(3))

    def captum_gradcam() -> torch.Tensor:
        cam = LayerGradCam(scalar, model.layer4).attribute(x, target=0, relu_attributions=True)
        cam = F.interpolate(cam, x.shape[-2:], mode="bilinear")[0, 0]
        return cam / cam.max().clamp_min(1e-12)

    ms = timed(captum_gradcam, args.repeats)
    ours = attribute(model, x, class_score(3), "gradcam", "layer4")[0]
    difference = float((captum_gradcam().detach() - ours).abs().max())
    rows.append(
        {
            "name": "captum LayerGradCam",
            "ms": round(ms, 2),
            "ratio": round(ms / base, 2),
            "max_difference_from_torchcam": round(difference, 6),
        }
    )
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"ResNet-18 at {args.size}x{args.size}, 1 thread, median of {args.repeats}")
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in ("name", "ms", "ratio")}
        print(f"{row['name']:<22}{row['ms']:>10.1f} ms {row['ratio']:>7.2f}x  {extra or ''}")


if __name__ == "__main__":
    main()
