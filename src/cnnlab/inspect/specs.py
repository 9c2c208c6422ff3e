"""Which model to inspect: a registered name, torchvision's, or the user's own code.

``build_model(spec, kwargs, input_size)`` accepts

- ``resnet50``: a model of cnnlab's registry (its channels follow ``input_size``);
- ``torchvision:resnet50``: any torchvision builder, without weights;
- ``path/to/file.py:Name`` or ``package.module:name``: a class or function of the user's
  that returns an ``nn.Module``, called with ``kwargs`` (a JSON object on the command line).

Every failure (a missing file, an import or syntax error, a name that is not there, a
call that fails, something that is not a module) is one line naming the spec.

``summarize_spec`` builds and summarises in one step, on the meta device where it can
(no memory, no initialisation: VGG-16's 138 M parameters cost nothing to inspect).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.inspect.summary import Summary, summarize
from cnnlab.models.factory import create_model, model_info

DEFAULT_INPUT = (3, 224, 224)


def parse_input_size(
    text: str | None, channels: tuple[int, ...] = (), max_side: int | None = None
) -> tuple[int, int, int] | None:
    """An input size as ``C,H,W`` (or ``CxHxW``): three positive integers, C among
    ``channels`` and H, W at most ``max_side`` where they are given (the explore page's
    limits); None (not given: the model's own size) stays None."""
    if text is None:
        return None
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    fits = len(size) == 3 and min(size) >= 1
    if fits and channels and size[0] not in channels:
        fits = False
    if fits and max_side is not None and max(size[1:]) > max_side:
        fits = False
    if not fits:
        limits = [f"C {' or '.join(map(str, channels))}"] if channels else []
        limits += [f"H and W at most {max_side}"] if max_side is not None else []
        raise CnnlabError(
            f"input {text!r}: expected C,H,W as three positive integers"
            + "".join(f", {limit}" for limit in limits)
            + " (3,224,224)"
        )
    return size  # type: ignore[return-value]


def build_model(
    spec: str, kwargs: dict[str, Any] | None = None, input_size: tuple[int, int, int] | None = None
) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model ``spec`` names, built with ``kwargs``, and the input size to inspect it at
    (``input_size``, else a registered model's natural one, else 3x224x224)."""
    kwargs = dict(kwargs or {})
    source, _, name = spec.rpartition(":")
    if not source:
        info = model_info(spec)  # unknown: CnnlabError with close names
        size = tuple(input_size or info.input_size)
        kwargs.setdefault("in_channels", size[0])
        if info.takes_img_size:
            kwargs.setdefault("img_size", (size[1], size[2]))
        return create_model(spec, **kwargs), size
    size = tuple(input_size or DEFAULT_INPUT)
    if source == "torchvision":
        return _torchvision(name, kwargs), size
    target = _load(source, spec, name)
    if isinstance(target, nn.Module) and not kwargs:  # a model the file built already
        return target, size
    if not callable(target):
        raise CnnlabError(f"{spec}: is a {type(target).__name__}, not a torch nn.Module")
    try:
        model = target(**kwargs)
    except Exception as error:  # the user's code: any failure is theirs, in one line
        raise CnnlabError(f"{spec}: calling it with {kwargs} failed: {_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise CnnlabError(f"{spec}: gave a {type(model).__name__}, not a torch nn.Module")
    return model, size


def summarize_spec(
    spec: str,
    kwargs: dict[str, Any] | None = None,
    input_size: tuple[int, int, int] | None = None,
    depth: int | None = None,
) -> tuple[nn.Module, Summary, tuple[int, int, int]]:
    """Build ``spec`` (as ``build_model``) and summarise it: (model, summary, input size).

    cnnlab's and torchvision's models are built and run on the meta device, which gives the
    same shapes, parameters, MACs and fields as the CPU without allocating a weight; a model
    whose forward needs real values (Faster R-CNN filters boxes by score) is rebuilt on the
    CPU. The user's own code always runs on the CPU: it may do anything with its tensors.
    """
    if ":" not in spec or spec.startswith("torchvision:"):
        try:
            with torch.device("meta"):
                model, size = build_model(spec, kwargs, input_size)
            return model, summarize(model, size, depth=depth, device="meta"), size
        except Exception:
            pass
    model, size = build_model(spec, kwargs, input_size)
    return model, summarize(model, size, depth=depth), size


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CnnlabError(f"torchvision has no model {name!r}{hint}")
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as error:
        raise CnnlabError(f"torchvision:{name}: {_line(error)}") from None


def _load(source: str, spec: str, name: str) -> Any:
    """The attribute ``name`` of a Python file or an importable module."""
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise CnnlabError(f"{path}: no such file")
        module_name = f"cnnlab_user_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            loader.loader.exec_module(module)
        except SyntaxError as error:
            raise CnnlabError(f"{path}:{error.lineno}: syntax error: {error.msg}") from None
        except Exception as error:
            raise CnnlabError(f"{path}: importing it failed: {_line(error)}") from None
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise CnnlabError(f"{spec}: cannot import {source} ({_line(error)})") from None
    if not hasattr(module, name):
        raise CnnlabError(f"{spec}: {source} has no {name!r}")
    return getattr(module, name)


def _line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
