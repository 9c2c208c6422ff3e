"""Effective receptive fields (Luo, Li, Urtasun & Zemel, "Understanding the Effective
Receptive Field in Deep Convolutional Neural Networks", NeurIPS 2016), measured.

The theoretical receptive field (``cnnlab summary``'s RF column) is every input pixel that
can reach a unit; the effective one is where the unit's gradient actually lies. For each
stage (the last layer at each output stride), the gradient of the stage's centre unit
(every channel at the centre position, seeded with 1) is taken with respect to the input,
its magnitude summed over channels and over a batch of inputs; the ERF is the smallest
square around the gradient's centre of mass that holds ``MASS`` of it. Luo et al. find it
a Gaussian much smaller than the theoretical field, growing as the square root of depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnlab.inspect.summary import summarize

MASS = 0.95  # the share of the gradient the reported square holds
BATCH = 8  # inputs the gradient is summed over


@dataclass
class StageField:
    """One stage's measured and theoretical receptive fields, in input pixels."""

    name: str  # the layer, as ``cnnlab summary`` names it
    stride: float  # input pixels between neighbouring units (the jump)
    theoretical: float  # the summary's receptive field
    radius: int  # half-side of the centred square holding MASS of the gradient
    gradient: Tensor  # (H, W) summed |d centre / d input|

    @property
    def effective(self) -> int:
        """The side of that square: 2 * radius + 1."""
        return 2 * self.radius + 1

    def to_dict(self) -> dict:
        return {
            "layer": self.name,
            "stride": self.stride,
            "theoretical_rf": self.theoretical,
            "erf_radius": self.radius,
            "erf": self.effective,
            "erf_share_of_rf": round(self.effective / self.theoretical, 4)
            if self.theoretical
            else None,
        }


def stages(
    model: nn.Module, input_size: tuple[int, int, int]
) -> list[tuple[str, int, float, float]]:
    """(layer name, which call of it, jump, theoretical RF) of the last layer at each
    output stride with a spatial output, in order, from ``cnnlab summary``'s rows (a
    module called more than once, as ResNet's ReLU, is one row per call)."""
    summary = summarize(model, input_size=input_size)
    found: dict[float, tuple[str, int, float, float]] = {}
    calls: dict[str, int] = {}
    for row in summary.layers:
        call = calls.get(row.name, 0)
        calls[row.name] = call + 1
        if row.jump is None or row.rf is None or len(row.output_shape) != 3:
            continue
        if row.output_shape[1] * row.output_shape[2] == 1:  # a global pool: no centre
            continue
        found[row.jump] = (row.name, call, row.jump, row.rf)
    return list(found.values())


def centre_gradient(model: nn.Module, layer: str, inputs: Tensor, call: int = 0) -> Tensor:
    """Summed |gradient| (H, W) of ``layer``'s centre unit (all channels) w.r.t. ``inputs``,
    at the layer's ``call``-th call in the forward pass."""
    module = model.get_submodule(layer)
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    x = inputs.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            model(x)
            out = captured[call]
            seed = torch.zeros_like(out)
            seed[:, :, out.shape[2] // 2, out.shape[3] // 2] = 1.0
            (grad,) = torch.autograd.grad(out, x, seed)
    finally:
        handle.remove()
    return grad.abs().sum(dim=(0, 1)).float()


def mass_radius(gradient: Tensor, mass: float = MASS) -> int:
    """The half-side of the smallest square centred at the gradient's centre of mass (to
    the nearest pixel) that holds ``mass`` of it."""
    total = float(gradient.sum())
    if total <= 0:
        return 0
    height, width = gradient.shape
    rows = torch.arange(height, dtype=torch.float64)
    cols = torch.arange(width, dtype=torch.float64)
    g = gradient.double()
    cy = round(float((g.sum(dim=1) * rows).sum()) / total)
    cx = round(float((g.sum(dim=0) * cols).sum()) / total)
    for radius in range(max(height, width)):
        window = g[max(0, cy - radius) : cy + radius + 1, max(0, cx - radius) : cx + radius + 1]
        if float(window.sum()) >= mass * total - 1e-9 * total:
            return radius
    return max(height, width)


def effective_fields(
    model: nn.Module,
    input_size: tuple[int, int, int],
    inputs: Tensor | None = None,
    seed: int = 0,
) -> list[StageField]:
    """Each stage's ERF beside its theoretical field; ``inputs`` (N, C, H, W) default to a
    batch of standard normal noise (Luo et al.'s random inputs)."""
    training = model.training
    model.eval()
    if inputs is None:
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn((BATCH, *input_size), generator=generator)
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    found = []
    try:
        for name, call, jump, rf in stages(model, input_size):
            gradient = centre_gradient(model, name, inputs, call).cpu()
            found.append(StageField(name, jump, rf, mass_radius(gradient), gradient))
    finally:
        model.train(training)
    return found


def erf_table(fields: list[StageField]) -> str:
    """The stages as text: stride, theoretical field, measured ERF and its share."""
    lines = [
        f"Effective receptive field (Luo et al. 2016): the centred square holding"
        f" {MASS:.0%} of the centre unit's input gradient",
        f"{'layer':<28}{'stride':>7}{'RF':>8}{'ERF':>7}{'ERF/RF':>8}",
    ]
    for f in fields:
        share = f"{f.effective / f.theoretical:.0%}" if f.theoretical else "-"
        lines.append(f"{f.name:<28}{f.stride:>7g}{f.theoretical:>8g}{f.effective:>7d}{share:>8}")
    return "\n".join(lines)
