"""The parameters of a layer and the formula that gives them, as a summary row shows it:
``3*3*128*64 + 64 = 73,792`` for a convolution, term by term for conv, linear and
normalisation layers, the layers' counts summed for a container."""

from __future__ import annotations

from torch import Tensor, nn


def param_formula(module: nn.Module, recurse: bool) -> tuple[int, str]:
    """Parameters of a module and the formula that gives them ("" without parameters);
    with ``recurse``, those of a container and everything in it."""
    if recurse and next(module.children(), None) is not None:
        return _container_count(module)
    params = dict(module.named_parameters(recurse=False))
    total = sum(p.numel() for p in params.values())
    if not total:
        return 0, ""
    terms = _layer_terms(module, params) or [_shape_term(p) for p in params.values()]
    return total, f"{' + '.join(terms)} = {total:,}"


def _container_count(module: nn.Module) -> tuple[int, str]:
    total = sum(p.numel() for p in module.parameters())
    if not total:
        return 0, ""
    parts = [n for m in module.modules() if (n := sum(p.numel() for p in m.parameters(False)))]
    if len(parts) > 4:
        return total, f"sum of {len(parts)} layers = {total:,}"
    return total, f"{' + '.join(f'{n:,}' for n in parts)} = {total:,}"


def _layer_terms(module: nn.Module, params: dict[str, Tensor]) -> list[str] | None:
    """The textbook formula for conv, linear and normalisation layers, term by term."""
    if "weight" not in params or set(params) - {"weight", "bias"}:
        return None
    weight, bias = params["weight"], params.get("bias")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight: (cin, cout/groups, *kernel)
        cout = f"({module.out_channels}/{module.groups})" if module.groups > 1 else weight.shape[1]
        term = "*".join(map(str, [*weight.shape[2:], weight.shape[0], cout]))
    elif isinstance(module, nn.modules.conv._ConvNd):
        # weight: (cout, cin/groups, *kernel)
        cin = f"({module.in_channels}/{module.groups})" if module.groups > 1 else weight.shape[1]
        term = "*".join(map(str, [*weight.shape[2:], cin, weight.shape[0]]))
    elif isinstance(module, nn.Linear):
        term = f"{weight.shape[1]}*{weight.shape[0]}"
    elif _is_norm(module) and bias is not None and bias.shape == weight.shape:
        return [f"2*{weight.numel()}"]
    else:
        return None
    return [term] if bias is None else [term, str(bias.numel())]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm)


def _shape_term(tensor: Tensor) -> str:
    return "*".join(map(str, tensor.shape)) or "1"
