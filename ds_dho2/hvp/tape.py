"""The criterion of a loop that computes its loss outside the model, recorded so a product can re-run it.

``loss = criterion(engine(x), y); engine.backward(loss)``: the model output carries no loss, so a replay of
the captured batch gives the output but not the loss. :class:`CriterionTape` records, with a
``TorchFunctionMode``, the torch calls the script makes between the end of the model's forward and the
``engine.backward(loss)`` that follows, keeps those the loss depends on, and replays them on a new output:
tensors the model produced are replaced by the new output's, everything else (labels, constants) is
reused, and tensors whose leading dimension is the batch's are cut like the replayed batch (a fraction of
the micro-batch). A criterion the tape cannot replay (in-place updates of the output, Python-side control
flow on values) simply gives no replay; the curvature then comes from the other routes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


@dataclasses.dataclass
class _Call:
    func: Callable
    args: tuple
    kwargs: dict
    outputs: list[int]  # ids of the tensors it returned
    in_place: bool


class _Recorder(TorchFunctionMode):
    def __init__(self, tape: "CriterionTape") -> None:
        super().__init__()
        self.tape = tape

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch protocol
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tensors = [t for t in tree_flatten(result)[0] if torch.is_tensor(t)]
        if tensors:
            in_place = getattr(func, "__name__", "").endswith("_") and not getattr(func, "__name__", "").endswith("__")
            self.tape.calls.append(_Call(func, args, kwargs, [id(t) for t in tensors], in_place))
            self.tape.keep_alive.extend(tensors)
        return result


class CriterionTape:
    """One micro-batch's criterion: started after the model's forward, finished at ``engine.backward``."""

    def __init__(self, output: Any, batch_size: int | None) -> None:
        self.outputs = [t for t in tree_flatten(output)[0] if torch.is_tensor(t)]
        self.batch_size = batch_size
        self.calls: list[_Call] = []
        self.keep_alive: list[torch.Tensor] = []
        self.loss_id: int | None = None
        self._mode: _Recorder | None = _Recorder(self)
        self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def finish(self, loss: torch.Tensor) -> bool:
        """Stop recording; keep only the calls ``loss`` depends on. True when the tape can replay it: the
        loss depends on the output and nothing on the way was changed in place."""
        self.stop()
        needed, wanted = [], {id(loss)}
        for call in reversed(self.calls):
            if wanted.intersection(call.outputs):
                if call.in_place:
                    self.calls, self.loss_id = [], None
                    return False
                needed.append(call)
                wanted.update(id(t) for t in tree_flatten((call.args, call.kwargs))[0] if torch.is_tensor(t))
        self.calls = list(reversed(needed))
        self.loss_id = id(loss) if wanted & {id(t) for t in self.outputs} else None
        self.keep_alive = [t for t in self.keep_alive if any(id(t) in c.outputs for c in self.calls)]
        return self.loss_id is not None

    @property
    def ready(self) -> bool:
        return self.loss_id is not None

    def replay(self, output: Any, stride: int = 1) -> torch.Tensor:
        """The loss of the recorded criterion on a new model ``output`` (of a batch cut with ``stride``)."""
        new = [t for t in tree_flatten(output)[0] if torch.is_tensor(t)]
        if len(new) != len(self.outputs):
            raise ValueError("the replayed model output has another structure than the recorded one")
        values: dict[int, torch.Tensor] = {id(a): b for a, b in zip(self.outputs, new)}

        def substitute(value: Any) -> Any:
            if not torch.is_tensor(value):
                return value
            if id(value) in values:
                return values[id(value)]
            if stride > 1 and self.batch_size and value.dim() >= 1 and value.shape[0] == self.batch_size:
                return value[::stride]
            return value

        result = None
        for call in self.calls:
            result = call.func(*tree_map(substitute, call.args), **tree_map(substitute, call.kwargs))
            produced = [t for t in tree_flatten(result)[0] if torch.is_tensor(t)]
            values.update({old_id: t for old_id, t in zip(call.outputs, produced)})
        if self.loss_id not in values:
            raise ValueError("the recorded criterion did not produce the loss")
        return values[self.loss_id]
