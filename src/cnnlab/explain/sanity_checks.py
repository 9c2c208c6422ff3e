"""The two sanity checks the literature asks of a saliency map, as functions of a model and
its maps (``audit`` runs them over a run's images):

- cascading model-parameter randomisation (Adebayo et al., "Sanity Checks for Saliency
  Maps", NeurIPS 2018): the weights are re-initialised from the head down, block by block
  (``cascade``, ``randomised``), and each map compared with the trained model's by
  Spearman rank correlation (``spearman``). A map that explains the model must change
  when the model does.
- deletion and insertion (Petsiuk et al., "RISE", BMVC 2018): the pixels are removed
  (replaced by the mean colour) or inserted (into a blurred copy) in the map's order, and
  the class probability's area under the curve compared with a random map's
  (``deletion_insertion``). A faithful map deletes evidence faster (lower AUC) and inserts
  it faster (higher AUC).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError

AUC_STEPS = 16  # fractions of the pixels deleted or inserted: 0, 1/16, ..., 1


def cascade(model: nn.Module, layer: str) -> list[tuple[str, list[str]]]:
    """The steps of cascading randomisation, each (what is random, the modules with weights
    random at that step), top first: the head (everything after ``layer``), then the top
    block (the last child of ``layer`` that has a convolution, and what follows it; for a
    layer without weights, the nearest module with weights before it), then a third, two
    thirds and all of the rest."""
    order = [name for name, _ in model.named_modules()]
    weighted = [name for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    inside = [name for name in weighted if name == layer or name.startswith(f"{layer}.")]
    if not inside:  # a layer without weights (a pool or an activation a backbone is cut at):
        # the nearest module with weights before it is its top block.
        before = [name for name in weighted if order.index(name) < order.index(layer)]
        if not before:
            raise CnnlabError(f"layer {layer!r} has no weights to randomise")
        inside = top = [before[-1]]
        top_name = top[0]
    else:
        module = model.get_submodule(layer)
        children = [
            (name, child)
            for name, child in module.named_children()
            if any(isinstance(m, nn.Conv2d) for m in child.modules())
        ]
        top_name = f"{layer}.{children[-1][0]}" if children else layer
        first = next(i for i, name in enumerate(inside) if name.startswith(top_name))
        top = inside[first:]
    after = weighted[weighted.index(inside[-1]) + 1 :]
    below = weighted[: weighted.index(top[0])]
    steps = [(f"head ({', '.join(_roots(after)) or 'none'})", after)]
    steps.append((f"+ top block ({top_name})", after + top))
    for share, label in ((1 / 3, "+ a third below"), (2 / 3, "+ two thirds below")):
        cut = len(below) - round(share * len(below))
        steps.append((label, after + top + below[cut:]))
    steps.append(("all", weighted))
    # A step that randomises nothing new (a model with little below its top block) is
    # left out; the first two always stay, the second being the one the check reads.
    kept = steps[:2]
    for step in steps[2:]:
        if len(step[1]) > len(kept[-1][1]):
            kept.append(step)
    return kept


def _roots(names: Sequence[str]) -> list[str]:
    roots: list[str] = []
    for name in names:
        root = name.split(".")[0]
        if root not in roots:
            roots.append(root)
    return roots


def randomised(model: nn.Module, names: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose modules ``names`` are re-initialised (their own
    ``reset_parameters``, as at construction; a BatchNorm also forgets its statistics)."""
    copied = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in names:
            module = copied.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for parameter in module.parameters(recurse=False):
                    nn.init.normal_(parameter, std=0.01)
    finally:
        torch.random.set_rng_state(generator_state)
    return copied.eval()


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of the flattened values, tied values sharing their mean rank (as
    scipy.stats.rankdata): ranking ties by position would make two maps that are both zero
    over the same pixels agree there by construction."""
    flat = values.flatten().double()
    order = flat.argsort()
    _, group, counts = torch.unique_consecutive(
        flat[order], return_inverse=True, return_counts=True
    )
    last = counts.cumsum(0).double()
    ranks = torch.empty_like(flat)
    ranks[order] = (last - (counts - 1) / 2)[group]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two maps (Pearson's of their average ranks)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else 0.0


def class_probability(model: nn.Module, index: int) -> Callable[[Tensor], Tensor]:
    """Inputs (N, C, H, W) -> class ``index``'s probability (N,) under a classifier."""

    def probability(batch: Tensor) -> Tensor:
        return model(batch).float().softmax(dim=1)[:, index]

    return probability


def deletion_insertion(
    probability: Callable[[Tensor], Tensor], x: Tensor, heat: Tensor, steps: int = AUC_STEPS
) -> tuple[float, float]:
    """(deletion AUC, insertion AUC) of ``probability`` (inputs (N, C, H, W) -> (N,) in
    [0, 1]: a class's, a box's score) as the pixels of ``x`` (1, C, H, W) are removed (set
    to 0, the mean colour) or inserted into a blurred copy in ``heat``'s order, highest
    first."""
    height, width = x.shape[-2:]
    order = heat.flatten().argsort(descending=True)
    blurred = _blur(x)
    deleted, inserted = [], []
    for step in range(steps + 1):
        count = round(step / steps * order.numel())
        mask = torch.zeros(order.numel(), device=x.device)
        mask[order[:count].to(x.device)] = 1.0
        mask = mask.view(1, 1, height, width)
        deleted.append(x * (1 - mask))
        inserted.append(blurred * (1 - mask) + x * mask)
    with torch.no_grad():
        p_del = probability(torch.cat(deleted)).float()
        p_ins = probability(torch.cat(inserted)).float()
    return float(torch.trapezoid(p_del, dx=1 / steps)), float(torch.trapezoid(p_ins, dx=1 / steps))


def _blur(x: Tensor) -> Tensor:
    side = min(x.shape[-2:])
    kernel = max(3, (side // 8) | 1)
    sigma = kernel / 3
    from torchvision.transforms.v2.functional import gaussian_blur

    return gaussian_blur(x, [kernel, kernel], [sigma, sigma])
