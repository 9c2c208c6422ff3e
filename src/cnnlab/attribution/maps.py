"""Attribution maps of any model: where in its input the evidence for one output lies.

``attribute(model, x, target, method, layer)`` returns one non-negative map per input
image, at the input's own resolution. The output explained is any scalar of the model's
output, given as a function (``class_score(c)`` for a classifier's logit; a segmenter's
class over a mask region, a detector's box score): the model is wrapped so that its one
output is that scalar, which every library below explains as "class 0".

The methods come from two maintained libraries, measured against each other in
``benchmarks/explain.py`` (docs/explain.md says why each is used where):

- torchcam: Grad-CAM and Score-CAM (class activation maps at ``layer``);
- Captum: Integrated Gradients, occlusion and (vanilla) saliency, which work on pixels;
- Eigen-CAM (the activations' first principal component) is in neither, and is a few
  lines here; so is Grad-CAM++: torchcam 0.5.0's never divides its alpha by the
  denominator (``alpha[idx][mask].div_(...)`` divides a copy), which leaves its weights
  the sum of g^2 relu(g), and Captum has none.

A map is made non-negative the way each method's authors read it: the CAMs are ReLU'd by
their definition, gradients (saliency, IG) are taken as magnitudes, and occlusion keeps
only the drops in the score (evidence for the output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.attribution import CAM_METHODS, METHODS
from cnnlab.errors import CnnlabError

Target = Callable[[Tensor], Tensor]  # model output (N, ...) -> scores (N,)

IG_STEPS = 32  # Integrated Gradients' Riemann steps: within 1% of 300 steps' completeness
SCORECAM_BATCH = 32  # masked images Score-CAM scores at a time


def class_score(index: int) -> Target:
    """The logit of class ``index``."""

    def score(output: Tensor) -> Tensor:
        return output.float().log_softmax(dim=1)[:, index]

    return score


def class_scores(indices: Sequence[int] | Tensor) -> list[Target]:
    """One ``class_score`` per image."""
    return [class_score(int(i)) for i in indices]


class ScalarModel(nn.Module):
    """``model`` with one output per image, ``target`` of its output, shaped (N, 1)."""

    def __init__(self, model: nn.Module, target: Target) -> None:
        super().__init__()
        self.model = model
        self.target = target

    def forward(self, x: Tensor) -> Tensor:
        return self.target(self.model(x)).reshape(-1, 1)


def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The submodule named ``layer`` (as ``cnnlab summary`` names it); an unknown name lists
    the valid ones."""
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        valid = ", ".join(name for name in modules if name)
        raise CnnlabError(f"unknown layer {layer!r}; the model's layers are: {valid}")
    return modules[layer]


def layer_output(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """The output of ``layer`` for input ``x`` (no gradient)."""
    captured: list = []
    handle = layer_module(model, layer).register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return captured[0]


def check_spatial(model: nn.Module, layer: str, x: Tensor) -> None:
    """CnnlabError unless ``layer`` outputs a map (N, C, H, W) for ``x``."""
    out = layer_output(model, layer, x[:1])
    if not isinstance(out, Tensor) or out.dim() != 4:
        shape = f"(its output is {tuple(out.shape[1:])})" if isinstance(out, Tensor) else ""
        raise CnnlabError(
            f"layer {layer!r} has no spatial output {shape}; name a layer whose output is a"
            " map (C, H, W), as `cnnlab summary` shows"
        )


def attribute(
    model: nn.Module,
    x: Tensor,
    target: Target | Sequence[Target],
    method: str,
    layer: str | nn.Module,
) -> Tensor:
    """Maps (N, H, W) >= 0 of ``target`` (one for all images, or one per image) over the
    input ``x`` (N, C, H, W), each scaled so that its largest value is 1 (an all-zero map
    stays zero). ``layer`` (a name, or the module itself inside ``model``) is where the CAM
    methods read the activations (the pixel methods ignore it). Each image is explained
    alone: Score-CAM and Captum batch an image's own perturbations, which a per-image target
    could not follow across images."""
    if method not in METHODS:
        raise CnnlabError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    targets = list(target) if isinstance(target, Sequence) else [target] * len(x)
    module = layer if isinstance(layer, nn.Module) else layer_module(model, layer)
    found = []
    with torch.enable_grad():
        for image, one in zip(x, targets, strict=True):
            scalar = ScalarModel(model, one).eval()
            if method in CAM_METHODS:
                heat = _cam(scalar, image[None], method, module)
                heat = F.interpolate(heat[:, None], x.shape[-2:], mode="bilinear")[:, 0]
            else:
                heat = _pixels(scalar, image[None], method)
            found.append(heat[0])
    maps = torch.stack(found).detach().float().clamp_min(0)
    # Not clamp_min(eps): a confident prediction's log-probability has gradients near
    # 1e-7 or below, and maps built of their powers can peak under any fixed floor
    # (torchcam's Grad-CAM++ peaked at 5e-14 on a demo digit, which a floor of 1e-12 drew
    # as a blank map).
    peak = maps.flatten(1).amax(dim=1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return maps / peak[:, None, None]


def _cam(scalar: ScalarModel, x: Tensor, method: str, module: nn.Module) -> Tensor:
    """(N, h, w) at the layer's resolution."""
    if method == "eigencam":
        return eigen_cam(scalar, x, module)
    if method == "gradcam++":
        return grad_cam_plus_plus(scalar, x, module)
    from torchcam.methods import GradCAM, ScoreCAM

    logging.getLogger("torchcam").setLevel(logging.ERROR)
    kinds = {"gradcam": GradCAM, "scorecam": ScoreCAM}
    options = {"batch_size": SCORECAM_BATCH} if method == "scorecam" else {}
    with kinds[method](scalar, target_layer=module, **options) as extractor:
        x = x.detach().requires_grad_(method != "scorecam")
        if method == "scorecam":
            with torch.no_grad():
                scores = scalar(x)
        else:
            scores = scalar(x)
        maps = extractor(class_idx=0, scores=scores, normalized=False)[0]
    return maps


def grad_cam_plus_plus(model: nn.Module, x: Tensor, module: nn.Module) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., 2018) of ``model``'s one output per image at
    ``module`` (N, h, w): each channel weighted by its positive gradients, each gradient
    weighted by alpha = g^2 / (2 g^2 + sum(A) g^3), the paper's closed form (and
    pytorch-grad-cam's)."""
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        scores = model(x.detach().requires_grad_())
    finally:
        handle.remove()
    activations = captured[0]
    (grads,) = torch.autograd.grad(scores.sum(), activations)
    activations, grads = activations.detach().float(), grads.float()
    squared = grads.pow(2)
    denominator = 2 * squared + activations.sum(dim=(2, 3), keepdim=True) * squared * grads
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(grads != 0, squared / safe, torch.zeros_like(grads))
    weights = (alpha * grads.clamp_min(0)).sum(dim=(2, 3), keepdim=True)
    return (weights * activations).sum(dim=1).clamp_min(0)


def eigen_cam(model: nn.Module, x: Tensor, module: nn.Module) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin, 2020): each image's activations at ``module``
    projected on their first principal component (h, w). The component's sign is chosen
    so that the projection agrees with the activations' mean over channels, an arbitrary
    choice of the SVD otherwise. Class-agnostic: it explains the layer, not an output."""
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    activations = captured[0].float()  # (N, C, h, w)
    _n, c, h, w = activations.shape
    maps = []
    for a in activations:
        rows = a.reshape(c, h * w).T  # (hw, C)
        centred = rows - rows.mean(dim=0)
        _, _, vt = torch.linalg.svd(centred, full_matrices=False)
        projection = centred @ vt[0]
        if torch.dot(projection, rows.mean(dim=1) - rows.mean()) < 0:
            projection = -projection
        maps.append(projection.reshape(h, w))
    return torch.stack(maps)


def _pixels(scalar: ScalarModel, x: Tensor, method: str) -> Tensor:
    """(N, H, W) from Captum's pixel attributions, reduced over channels."""
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    x = x.detach()
    if method == "saliency":
        grads = Saliency(scalar).attribute(x.requires_grad_(), target=0, abs=True)
        return grads.amax(dim=1)
    if method == "ig":
        # The baseline is the zero of the normalised input: the data set's mean colour.
        found = IntegratedGradients(scalar).attribute(
            x, baselines=torch.zeros_like(x), target=0, n_steps=IG_STEPS, internal_batch_size=16
        )
        return found.sum(dim=1).abs()
    side = min(x.shape[-2:])
    window, stride = max(2, side // 8), max(1, side // 16)
    found = Occlusion(scalar).attribute(
        x,
        sliding_window_shapes=(x.shape[1], window, window),
        strides=(x.shape[1], stride, stride),
        baselines=0.0,
        target=0,
        perturbations_per_eval=16,
    )
    return found.mean(dim=1)


def top_share(attribution: Tensor, fraction: float = 0.1) -> float:
    """The share of a non-negative map's total in its ``fraction`` highest pixels (1.0: all
    its mass there; ``fraction`` for a flat map)."""
    values = attribution.flatten().float()
    total = float(values.sum())
    if total <= 0:
        return 0.0
    count = max(1, round(fraction * values.numel()))
    return float(values.topk(count).values.sum()) / total


def peak_of(attribution: Tensor) -> tuple[int, int]:
    """(row, col) of a map's largest value."""
    row, col = divmod(int(attribution.argmax()), attribution.shape[-1])
    return row, col
