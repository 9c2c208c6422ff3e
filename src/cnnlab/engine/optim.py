"""The optimizer, its learning-rate schedule and mixed precision, from a TrainConfig."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cnnlab import transfer
from cnnlab.config import TrainConfig


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a half cosine from
    1 down to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD over the trainable parameters, with no weight decay on biases and
    norm scales (1-D tensors: decaying them only hurts). With a ``backbone_lr_mult`` the
    head's groups come first, so group 0 has the run's lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mult = cfg.backbone_lr_mult
    head = transfer.head_parameter_names(model) if mult != 1 else {n for n, _ in named}
    groups = [
        {
            "params": [p for n, p in named if (n in head) == in_head and (p.ndim > 1) == decay],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr": cfg.lr if in_head else cfg.lr * mult,
        }
        for in_head in (True, False)
        for decay in (True, False)
    ]
    groups = [g for g in groups if g["params"]]
    # The fused kernels update every tensor in one pass (on a CPU, AdamW's step over a
    # detector's 26M parameters drops from about 1 s to 0.1 s); they exist for these two.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    extra = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **extra)
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=cfg.lr, **extra)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: None off CUDA or with ``off``."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel keeping an exponential moving average of ``model``'s weights
    and buffers (BatchNorm statistics too, as timm's ModelEmaV3). The decay warms up as
    timm's, min(decay, (1 + t) / (10 + t)) at update t: a run of a few hundred steps
    would otherwise average mostly its random initialisation."""
    return MovingAverage(model, decay)


class MovingAverage(AveragedModel):
    """``AveragedModel`` (same state_dict: ``module.*`` and ``n_averaged``) whose update
    after every step is ``ema_model``'s rule over tensor lists gathered once: AveragedModel
    gathers and groups every parameter and buffer again at each step, which cost as much
    as a tenth of the demo's ConvNet step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self._tensors: tuple[nn.Module, list, list, list, list] | None = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """The first update copies ``model``'s weights and buffers; update t moves the
        floating-point ones towards ``model``'s by 1 - min(decay, (1 + t) / (10 + t));
        counters such as BatchNorm's num_batches_tracked follow the model."""
        if self._tensors is None or self._tensors[0] is not model:
            averaged = [*self.module.parameters(), *self.module.buffers()]
            current = [*model.parameters(), *model.buffers()]
            if len(averaged) != len(current):
                raise ValueError("the moving average and the model have different tensors")
            pairs = [(a.detach(), c.detach()) for a, c in zip(averaged, current, strict=True)]
            floats = [pair for pair in pairs if torch.is_floating_point(pair[0])]
            others = [pair for pair in pairs if not torch.is_floating_point(pair[0])]
            self._tensors = (
                model,
                [a for a, _ in floats],
                [c for _, c in floats],
                [a for a, _ in others],
                [c for _, c in others],
            )
        _, averaged, current, averaged_counts, counts = self._tensors
        updates = int(self.n_averaged)
        if updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            rate = min(self.decay, (1 + updates) / (10 + updates))
            torch._foreach_lerp_(averaged, current, 1 - rate)
        for mean, value in zip(averaged_counts, counts, strict=True):
            mean.copy_(value)
        self.n_averaged += 1
