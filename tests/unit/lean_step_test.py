"""The non-refresh step reads nothing back from the device: no ``.item()``, ``float()``, ``bool()`` or
``.tolist()`` of a tensor inside ``DHO2.step()`` between refreshes (on a GPU each would stall the stream).

The check wraps those ``torch.Tensor`` methods to raise while a step runs; refreshes and the periodic
non-finite check (every ``max_nonfinite_steps`` steps) are allowed to read values and are kept out of the
checked steps.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

from ds_dho2 import DHO2

_READERS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads() -> Iterator[list[str]]:
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _READERS}

    def guard(name: str):
        def read(self, *args, **kwargs):
            seen.append(name)
            raise AssertionError(f"DHO2.step() read a tensor on the host with Tensor.{name}")
        return read

    for name in _READERS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("base, admm, decay", [("adamw", False, 0.0), ("adamw", True, 0.01), ("heavyball", False, 0.0)])
def test_non_refresh_steps_do_not_read_device_values(base: str, admm: bool, decay: float) -> None:
    model = _Net()
    groups = [{"params": [model.net[0].weight, model.net[2].weight], "weight_decay": decay},
              {"params": [model.net[0].bias, model.net[2].bias], "weight_decay": 0.0}]
    opt = DHO2(groups, lr=1e-2, rank=3, refresh_interval=5, warmup_steps=2, max_nonfinite_steps=1000,
               base=base, curvature={"max_interval": 5, "back_off": False},
               admm={"enabled": admm, "window": 3, "extrapolation": "spread"}).attach(model)
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for step in range(1, 16):
        x, y = torch.randn(16, 10, generator=generator), torch.randint(0, 4, (16,), generator=generator)
        opt.zero_grad()
        model(x, y).backward()
        refresh_due = opt.tracker.wants_products(step) or (admm and step % 3 == 0)
        if refresh_due or step == 1:
            opt.step()
            continue
        with no_host_reads():
            opt.step()
        checked += 1
    assert opt.eigenvalues is not None, "the checked steps must include hybrid steps with a basis"
    assert checked >= 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
