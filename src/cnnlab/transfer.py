"""Fine-tuning a pretrained model: which parameters are the head, freezing the backbone.

The head is what the registry records as the model's classifier (``ModelInfo.classifier``:
``fc`` for ResNet, ``classifier`` for VGG, ...), plus any parameter the weight loader
skipped because its shape differs from the file's (``model.pretrained_report.skipped``: a
layer sized by the number of classes outside those modules). Everything else is the
backbone. For every zoo model the skipped tensors lie inside the classifier modules, so a
resumed run (which loads no weight file) finds the same head.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models.factory import model_info
from cnnlab.registry import classifier_modules


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the classifier head's parameters."""
    names = {
        f"{prefix}.{name}"
        for prefix, module in classifier_modules(model).items()
        for name, _ in module.named_parameters()
    }
    report = getattr(model, "pretrained_report", None)
    if report is not None:
        own = dict(model.named_parameters())
        names |= {name for name in report.skipped if name in own}
    if not names:
        model_name = getattr(model, "model_name", type(model).__name__)
        raise CnnlabError(f"{model_name}: the registry names no classifier head for it")
    return names


def freeze_backbone(model: nn.Module) -> int:
    """Stop gradients to every parameter outside the head; returns how many stay trainable.

    BatchNorm running statistics are buffers, not parameters: ``backbone_norms_eval`` keeps
    them frozen too and must follow every ``model.train()``.
    """
    head = head_parameter_names(model)
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in head)
        trainable += parameter.numel() if name in head else 0
    return trainable


def backbone_norms_eval(model: nn.Module) -> None:
    """Put the backbone's normalisation layers in eval mode: they normalise with the loaded
    running statistics and stop updating them (the head's own norms keep training)."""
    head_modules = {name.rsplit(".", 1)[0] for name in head_parameter_names(model)}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and not _inside(name, head_modules):
            module.eval()


def _inside(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve_weights(model: str, weights: str) -> Path:
    """The file ``weights`` stands for: itself, or for ``"torchvision"`` the model's file in
    the torch hub cache (CnnlabError saying where to put it when missing)."""
    from cnnlab.weights import find_torchvision_weights

    path = (
        find_torchvision_weights(model_info(model)) if weights == "torchvision" else Path(weights)
    )
    if not path.is_file():
        raise CnnlabError(f"{path}: weight file not found")
    return path.absolute()
