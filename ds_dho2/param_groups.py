"""What DHO2 accepts as parameters, and the weight decay it applies per element.

One curvature subspace spans all parameters (FOSI's semantics), so DHO2 keeps a single internal
parameter group: groups passed in may differ only in ``weight_decay`` (as the Hugging Face Trainer's decay
/ no-decay groups do), which is then applied per element. Parameters may be given as ``model.parameters()``,
``model.named_parameters()``, a list of tensors or a list of group dicts; anything else is refused here,
at construction, with a message saying what to pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from ds_dho2.dist.layout import ShardLayout

#: group keys that may differ between groups, and group keys that are only labels
_PER_GROUP = ("params", "weight_decay", "name", "param_names")


@dataclasses.dataclass
class MergedGroups:
    """The parameters of every group in order, each one's weight decay, and the shared group settings."""

    params: list[torch.Tensor]
    weight_decays: list[float]
    settings: dict[str, Any]


def merge_param_groups(params: Any, weight_decay: float) -> MergedGroups:
    """Flatten the given groups into one list of parameters with a weight decay per parameter."""
    if torch.is_tensor(params):
        raise TypeError("DHO2 expects an iterable of parameters (e.g. model.parameters()) or of parameter groups; "
                        "got a single tensor. Pass [tensor] to optimize one tensor.")
    groups = list(params)
    if not groups:
        raise ValueError("DHO2 got an empty parameter list: pass model.parameters() of a model with parameters.")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    merged, decays, reference = [], [], None
    for index, group in enumerate(groups):
        group_params = _tensors_of(group["params"])
        settings = {k: v for k, v in group.items() if k not in _PER_GROUP}
        if reference is None:
            reference = settings
        elif settings != reference:
            differing = sorted(k for k in set(settings) | set(reference) if settings.get(k) != reference.get(k))
            raise ValueError(
                f"DHO2 parameter group {index} differs from group 0 in {differing}. DHO2 estimates one curvature "
                "subspace over all parameters, so its groups may differ only in 'weight_decay'. Use one group, "
                "or give every group the same settings.")
        for p in group_params:
            merged.append(p)
            decays.append(float(group.get("weight_decay", weight_decay)))
    check_parameters(merged)
    return MergedGroups(params=merged, weight_decays=decays, settings=reference or {})


def _tensors_of(params: Any) -> list[torch.Tensor]:
    """The tensors of a group's ``params``: a tensor, tensors, or ``(name, tensor)`` pairs."""
    items = [params] if torch.is_tensor(params) else list(params)
    return [item[1] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) else item
            for item in items]


def check_parameters(params: list[Any]) -> None:
    """Refuse, with a message naming the fix, what DHO2 cannot optimize."""
    if not params:
        raise ValueError("DHO2 got no parameters (every group's 'params' is empty): pass model.parameters() of a "
                         "model with parameters.")
    seen: set[int] = set()
    for index, p in enumerate(params):
        if not torch.is_tensor(p):
            raise TypeError(f"DHO2 parameter {index} is a {type(p).__name__}, not a tensor: pass model.parameters(), "
                            "model.named_parameters() or a list of tensors / parameter groups.")
        if not p.is_leaf:
            raise ValueError(f"DHO2 parameter {index} is not a leaf tensor (it was computed from others): pass the "
                             "model's parameters themselves.")
        if p.is_complex():
            raise TypeError(f"DHO2 parameter {index} is complex ({p.dtype}); DHO2 optimizes real parameters only. "
                            "Optimize torch.view_as_real(param) or keep complex parameters in another optimizer.")
        if not p.is_floating_point():
            raise TypeError(f"DHO2 parameter {index} has dtype {p.dtype}; only floating-point parameters can be "
                            "optimized.")
        if id(p) in seen:
            raise ValueError("DHO2 got the same parameter twice; each parameter may appear in one group only.")
        seen.add(id(p))


class WeightDecay:
    """Decoupled weight decay: one number, or one value per element of this rank's flat vector."""

    def __init__(self, decay_by_param: dict[int, float]) -> None:
        self.decay_by_param = dict(decay_by_param)
        self._vector: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return len(set(self.decay_by_param.values())) <= 1

    def add(self, params: Iterable[torch.Tensor], decay: float) -> None:
        self.decay_by_param.update({id(p): float(decay) for p in params})
        self._vector = None

    def invalidate(self) -> None:
        """Forget the per-element vector (the layout changed)."""
        self._vector = None

    def value(self, group: dict, layout: ShardLayout, dtype: torch.dtype, device: torch.device) -> float | torch.Tensor:
        """The group's ``weight_decay`` when it is uniform, else this rank's per-element vector."""
        if self.uniform:
            return group["weight_decay"]
        if self._vector is None:
            decays = [self.decay_by_param[id(p)] for p in layout.params]
            self._vector = layout.per_element(decays, dtype, device)
        return self._vector
