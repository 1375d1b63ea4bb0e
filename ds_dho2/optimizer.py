"""``DHO2``: the hybrid-order optimizer as a ``torch.optim.Optimizer``; this module is the step.

Each part of the step owns its state and its arithmetic: the base optimizer (:mod:`ds_dho2.update.base`),
the Newton momentum (:mod:`~ds_dho2.update.newton`), the ADMM coupling (:mod:`~ds_dho2.update.admm`), the
non-finite guard (:mod:`~ds_dho2.update.guard`) and the curvature tracker
(:class:`~ds_dho2.curvature.CurvatureTracker`), whose loss comes through a
:class:`~ds_dho2.curvature.route.LossRoute`. Where the flat vector ``x`` comes from (a ZeRO partition or
the module's parameters) is one :class:`~ds_dho2.dist.flat.FlatParameters` object; the math is in
``ds_dho2.core``; the saved form is built from the parts' state declarations by :mod:`ds_dho2.checkpoint`.

A step never reads a value on the host (no ``.item()``): a non-finite gradient is skipped with masked
arithmetic, and the statistics stay tensors until :meth:`DHO2.curvature_stats` reads them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch

from ds_dho2 import checkpoint
from ds_dho2.config import DHO2Config
from ds_dho2.core import hybrid
from ds_dho2.core.state import ComponentState
from ds_dho2.curvature.route import LossRoute
from ds_dho2.curvature.tracker import CurvatureTracker
from ds_dho2.dist.comm import Communicator, LocalCommunicator
from ds_dho2.dist.flat import FlatParameters, ParameterPartitions, PartitionParameters, SeparateParameters
from ds_dho2.dist.layout import ParameterShardLayout, ShardLayout
from ds_dho2.hvp.capture import LossFn
from ds_dho2.logging_utils import log_on_main_rank
from ds_dho2.param_groups import WeightDecay, check_parameters, merge_param_groups
from ds_dho2.update.admm import ADMMCoupling
from ds_dho2.update.base import make_base_step
from ds_dho2.update.guard import NonFiniteGradientError, NonFiniteGuard
from ds_dho2.update.newton import NewtonStep
from ds_dho2.update.rollback import Rollback

logger = logging.getLogger(__name__)

__all__ = ["DHO2", "NonFiniteGradientError"]


class DHO2(torch.optim.Optimizer):
    """Hybrid-order optimizer: a Newton step in the top-k Hessian subspace, AdamW / heavy-ball elsewhere.

    Keyword arguments are the fields of :class:`ds_dho2.config.DHO2Config` (validated there). Call
    :meth:`attach` once with the model so curvature refreshes can re-run it on the last training batch (a
    DeepSpeed engine does this itself and also hands DHO2 the loss of ``engine.backward``); until the
    first refresh the optimizer is exactly its base optimizer.
    """

    def __init__(self, params: Iterable[Any], lr: float | None = None, **options: Any) -> None:
        if lr is not None:
            options["lr"] = lr
        config = DHO2Config(**options)
        groups = merge_param_groups(params, config.weight_decay)
        config = _rank_within(config, sum(getattr(p, "ds_numel", p.numel()) for p in groups.params))
        self.config = config
        defaults = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                        alpha=config.alpha, momentum=config.momentum, newton_momentum=config.newton_momentum,
                        reference_lr=config.lr)
        super().__init__([{"params": groups.params}], defaults)
        self.weight_decay = WeightDecay({id(p): wd for p, wd in zip(groups.params, groups.weight_decays)})
        if self.weight_decay.uniform:
            self.param_groups[0]["weight_decay"] = groups.weight_decays[0]
        self.tracker = CurvatureTracker(config)
        self.route = LossRoute(config, self.tracker, next_step=lambda: self._steps + 1)
        self.base = make_base_step(config)
        self.newton = NewtonStep(self.base.adam_type)
        self.tracker.payoff = self.newton.mean_share
        self.admm = ADMMCoupling(config)
        self.guard = NonFiniteGuard(config.max_nonfinite_steps, config.divergence_growth)
        self.rollback = Rollback(config)
        #: every part whose state is saved, by name; a part is anything with a ``state`` declaration
        self.components: dict[str, Any] = {"base": self.base, "curvature": self.tracker, "newton": self.newton,
                                           "admm": self.admm, "guard": self.guard}
        self._flat: FlatParameters | None = None
        self._comm: Communicator = LocalCommunicator()
        self._batch_comm: Communicator = self._comm
        self._steps = 0
        self._materialized = False
        self._step_stats: dict[str, Any] = {}

    @classmethod
    def from_config(cls, params: Iterable[Any], config: dict[str, Any]) -> "DHO2":
        """Build from a plain dict (a DeepSpeed ``"params"`` block), validated by ``DHO2Config.from_dict``."""
        DHO2Config.from_dict(config)
        return cls(params, **config)

    # ----------------------------------------------------------------------------------------- wiring
    def attach(self, model: torch.nn.Module, loss_fn: LossFn | None = None) -> "DHO2":
        """Learn the model: forward hooks capture each training batch; refreshes re-run the model on it.

        Without ``loss_fn`` the loss is the output itself (a scalar), its ``.loss`` or its ``["loss"]``;
        ``loss_fn(output, args, kwargs)`` computes it otherwise. Under a DeepSpeed engine neither is
        needed: DHO2 takes its products on the loss handed to ``engine.backward``.
        """
        self.route.attach(model, loss_fn)
        return self

    def bind_partition(self, layout: ShardLayout | ParameterShardLayout, comm: Communicator,
                       partition: torch.Tensor | None = None,
                       release_after_backward: Callable[[], None] | None = None,
                       quiet_products: Callable[[], Any] | None = None) -> None:
        """Use a rank's flat partition (DeepSpeed ZeRO): ``partition`` (default ``param_groups[0]['params'][0]``,
        ZeRO-1/2's fp32 partition; ZeRO-3 passes its sub-group's, which it puts in the group only during
        ``step()``), ``layout`` maps it to the module's parameters and ``comm`` is the data-parallel group;
        ``release_after_backward`` (ZeRO-3) releases the layers a products backward left gathered, and
        ``quiet_products`` is the context ZeRO-3 products run in (no prefetching)."""
        partition = self.param_groups[0]["params"][0] if partition is None else partition
        if isinstance(layout, ParameterShardLayout):
            self._flat = ParameterPartitions(layout, partition)
            self.route.products_in_step_only = True
            if release_after_backward is not None:
                self.route.release_after_backward = release_after_backward
            if quiet_products is not None:
                self.route.quiet_products = quiet_products
        else:
            self._flat = PartitionParameters(layout, partition)
        self._comm = self._batch_comm = comm
        self.weight_decay.invalidate()  # the per-element vector is rebuilt for the partition
        self.tracker.bind(layout, comm, comm)

    def bind_replicated(self, batch_comm: Communicator) -> None:
        """Parameters are whole on every rank (ZeRO stage 0): curvature averages HVPs over ``batch_comm``."""
        self._flat, self._comm, self._batch_comm = None, LocalCommunicator(), batch_comm

    def bind_engine_backward(self, is_boundary: Callable[[], bool]) -> None:
        """Products may be taken on the loss of ``engine.backward`` (see :meth:`on_backward`);
        ``is_boundary()`` says whether the current micro-batch ends a gradient-accumulation window."""
        self.route.bind_engine_backward(is_boundary)

    @property
    def model(self) -> torch.nn.Module | None:
        return self.route.model

    def flat_parameters(self) -> FlatParameters:
        """The flat ``x`` this optimizer updates (the module's parameters unless bound to a partition)."""
        if self._flat is None:
            layout = ShardLayout.unsharded(self.param_groups[0]["params"])
            self._flat = SeparateParameters(layout)
            self.tracker.bind(layout, self._comm, self._batch_comm)
        return self._flat

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters (plain PyTorch only): they join the one internal group, their moments start at
        zero and the curvature subspace spans them from the next refresh."""
        if not hasattr(self, "components"):  # torch.optim.Optimizer.__init__ adding the first group
            super().add_param_group(param_group)
            return
        if isinstance(self._flat, PartitionParameters) or self.route.engine_backward:
            raise ValueError(
                "DHO2 cannot take new parameters after deepspeed.initialize: the engine has already laid them out "
                "(and ZeRO partitioned them). Pass every parameter to deepspeed.initialize, with requires_grad=False "
                "on those to train later.")
        group = self.param_groups[0]
        new = merge_param_groups([param_group], self.config.weight_decay)
        differing = sorted(k for k, v in new.settings.items() if group.get(k) != v)
        if differing:
            raise ValueError(f"DHO2 add_param_group: the new group differs from the existing one in {differing}. DHO2 "
                             "keeps one group (one curvature subspace), so added groups may differ only in "
                             "'weight_decay'.")
        check_parameters(group["params"] + new.params)
        self._grow(new.params, new.weight_decays[0])

    def _grow(self, params: list[torch.Tensor], weight_decay: float) -> None:
        """Let ``params`` join the flat vector: sharded state is padded with zeros (the ADMM anchor with their
        values), and a refresh in flight restarts, so the next basis spans them."""
        group = self.param_groups[0]
        old_numel = None if self._flat is None else self._flat.numel
        group["params"] = list(group["params"]) + list(params)
        self.weight_decay.add(params, weight_decay)
        if self.weight_decay.uniform:
            group["weight_decay"] = weight_decay
        self._flat = None
        flat = self.flat_parameters()
        if not self._materialized or old_numel is None:
            return
        for state in self.component_states().values():
            state.resize_partition(flat.numel)
        if self.admm.state.anchor is not None:
            self.admm.state.anchor[old_numel:] = flat.values()[old_numel:]
        curvature = self.tracker.state
        if curvature.lanczos is not None:
            curvature.lanczos, curvature.lanczos_started_at = None, None
            curvature.next_refresh = self._steps + 1
        self._mirror_torch_state()

    # ------------------------------------------------------------------------------------- inspection
    @property
    def eigenvalues(self) -> torch.Tensor | None:
        """The current k eigenvalues (replicated on every rank), or None before the first refresh."""
        return self.tracker.state.eigenvalues

    @property
    def local_eigenvectors(self) -> torch.Tensor | None:
        """This rank's k x P_r slice of the eigenvectors (the whole P when unsharded), or None."""
        return self.tracker.state.eigenvectors

    @property
    def local_lanczos_basis(self) -> torch.Tensor | None:
        """This rank's m x P_r Lanczos basis while a refresh is in flight, else None."""
        run = self.tracker.state.lanczos
        return None if run is None else run.basis

    @property
    def steps(self) -> int:
        """Steps taken (including skipped ones)."""
        return self._steps

    # ------------------------------------------------------------------------------------------- step
    def graph_products_due(self) -> bool:
        """Whether the next training forward must build a graph that supports products (a read-only check)."""
        return self.route.graph_products_due()

    def on_backward(self, loss: torch.Tensor, scale: float) -> None:
        """Called by the engine's ``backward(loss)`` before it differentiates: on a boundary micro-batch of
        a step that is due for products, run them on this loss's graph (``scale``: see
        ``ds_dho2.curvature.loss_scale``)."""
        self._prepare()
        self.route.on_backward(loss, scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adopt_pending_checkpoint()
        grad = self.flat_parameters().gradient()
        if grad is None:
            return loss
        self._prepare()
        self._steps += 1
        self.route.in_step(self._steps)
        self._update(grad, self._steps)
        if self.guard.check(self._steps):
            self._on_divergence(self._steps)
        return loss

    def _on_divergence(self, step: int) -> None:
        """The gradient norm rose tenfold within a few steps: if curvature is in use, drop the basis (and
        with it the Newton momentum) and halve a heavy-ball boost; with a kept good point (a boosted
        heavy-ball base) put it back and measure again after ``refresh_interval`` steps, else refresh early.
        Said once."""
        if self.tracker.basis is None:
            return
        boost = self.base.shrink_boost()
        momentum = getattr(self.base.state, "momentum_buffer", None)
        restored = None if momentum is None else self.rollback.restore(self.flat_parameters(), momentum)
        stats = self.tracker.stats
        events = stats["divergence_guard_events"] = stats.get("divergence_guard_events", 0) + 1
        reason = (f"the gradient norm rose more than tenfold within {self.config.max_nonfinite_steps} steps at "
                  f"step {step} (a curvature-driven divergence?)"
                  + (f"; heavy-ball boost cut to {boost:.2g} of lr_clip - 1" if boost else ""))
        level = logging.WARNING if events == 1 else logging.DEBUG
        if restored is None:
            log_on_main_rank(logger, level, "DHO2 dropped its curvature basis and refreshes early: %s.", reason)
            self.tracker.drop_basis(reason, quiet=True)
            return
        stats["rollbacks"] = stats.get("rollbacks", 0) + 1
        self.guard.forget_mean()
        self.admm.restart(self.flat_parameters())
        log_on_main_rank(logger, level, "DHO2 dropped its curvature basis and measures it again after %d steps: "
                         "%s; parameters and momentum put back to step %d.", self.config.refresh_interval,
                         reason, restored)
        self.tracker.pause(step, self.config.refresh_interval)

    def engine_skipped_step(self) -> None:
        """DeepSpeed skipped this step before calling DHO2 (inf/NaN gradients): count it for the guard."""
        self.guard.engine_skipped(self._steps)

    def _update(self, grad: torch.Tensor, step: int) -> None:
        """One hybrid step (docs/design.md, "The step"): split the gradient by the basis, take the base step
        on the complement and the Newton step in the subspace, apply both with weight decay."""
        group, flat, comm = self.param_groups[0], self._flat, self._comm
        dtype = self.base.dtype
        grad = self.admm.gradient(grad.to(dtype))
        basis = self.tracker.basis
        if self.rollback.active and basis is not None:
            self.rollback.before_step(basis.version, step - 1, flat, self.base.state.momentum_buffer)
        split = hybrid.split_gradient(grad, basis, comm)
        keep = (split.nonfinite == 0).to(dtype)
        direction = self.base.direction(split.complement, keep, group)
        stats: dict[str, Any] = {"skipped": 1 - keep}
        if basis is not None:
            newton = self.newton.coefficients(basis, split, keep, group, self.tracker.transition)
            finish = hybrid.finish_update(direction, basis, newton, comm, base_scale=self.base.scale(basis, group),
                                          newton_max_ratio=self.config.newton_max_ratio,
                                          total_numel=flat.layout.total_numel, split=split)
            self.newton.observe(finish)
            stats.update(subspace_grad_fraction=(split.coefficients, split.grad_sq), newton_trust_scale=finish)
        self.admm.add_pending(direction, keep)
        flat.apply(direction, group["lr"], self.weight_decay.value(group, flat.layout, dtype, direction.device), keep)
        self.guard.record(keep, split.grad_sq, watch=basis is not None)
        if self.admm.due(step):
            self.admm.window_end(flat, comm, self.route.loss_evaluator())
        self._step_stats = stats

    def _prepare(self) -> None:
        """Create the parts' state for this run's layout, once (a loaded state is kept)."""
        if self._materialized:
            return
        flat = self.flat_parameters()
        self.base.materialize(flat.numel, flat.dtype, flat.device)
        self.admm.materialize(flat, self.base.dtype)
        self.guard.materialize(flat.device)
        self._mirror_torch_state()
        self._materialized = True

    def _mirror_torch_state(self) -> None:
        """``optimizer.state[x]`` shows the base moments under their usual names (the same tensors), for
        tools that read an optimizer's state the torch way (DeepSpeed's ``safe_get_full_optimizer_state``)."""
        self.state[self.flat_parameters().state_key] = self.base.torch_entries()

    # ------------------------------------------------------------------------------------ checkpoints
    def component_states(self) -> dict[str, ComponentState]:
        return {name: part.state for name, part in self.components.items()}

    def state_dict(self) -> dict:
        """The saved form (:mod:`ds_dho2.checkpoint`): ``state[0]`` holds ``step`` and every sharded vector,
        ``param_groups[0]["dho2_replicated"]`` everything replicated. DeepSpeed's regular and universal
        checkpoints both carry it."""
        self._adopt_pending_checkpoint()
        out = super().state_dict()
        out["state"] = {}
        if self._materialized:
            flat, replicated = checkpoint.pack(self.component_states(), self.flat_parameters().layout.record(),
                                               self._steps)
            out["state"] = {0: flat}
            out["param_groups"][0][checkpoint.GROUP_KEY] = replicated
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s saved form: hyper-parameters as torch does, the parts' state from their
        declarations (dtypes kept, tensors copied). A state saved at another layout is refused with a
        message naming the way to convert it."""
        groups = [dict(group) for group in state_dict["param_groups"]]
        replicated = groups[0].pop(checkpoint.GROUP_KEY, None) if groups else None
        entry = dict(state_dict["state"].get(0, {}))
        if replicated is None and entry:
            checkpoint.check_format(None)  # state without DHO2's saved form: an earlier version's
        super().load_state_dict({**state_dict, "state": {}, "param_groups": groups})
        if replicated is not None:
            self._restore(entry, replicated, universal=False, copy=True)

    def adopt_checkpoint_state(self, universal: bool = False) -> bool:
        """Turn the saved form that a DeepSpeed universal-checkpoint load wrote straight into the state and
        param group (it never calls :meth:`load_state_dict`) into live state, laid out for this run's
        partition. True when something was adopted. With ``universal``, loaded state without DHO2's saved
        form (a checkpoint converted by DeepSpeed's own ds_to_universal) raises
        :class:`~ds_dho2.checkpoint.CheckpointFormatError` naming ``ds-dho2 to-universal``."""
        group = self.param_groups[0]
        replicated = group.pop(checkpoint.GROUP_KEY, None)
        entry = dict(self.state.get(self.flat_parameters().state_key) or {})
        if replicated is None:
            if universal and checkpoint.STEP_KEY in entry:
                raise checkpoint.CheckpointFormatError(checkpoint.missing_state_message(
                    f"no '{checkpoint.GROUP_KEY}' in its param_groups"))
            return False
        self._restore(entry, replicated, universal=True, copy=False)
        logger.info("DHO2 adopted its checkpointed state for world size %d (saved at world size %d).",
                    self.flat_parameters().layout.world_size, replicated["layout"]["world_size"])
        return True

    def _adopt_pending_checkpoint(self) -> None:
        if checkpoint.GROUP_KEY in self.param_groups[0]:  # a universal load wrote the saved form in place
            self.adopt_checkpoint_state(universal=True)

    def _restore(self, entry: dict, replicated: dict, *, universal: bool, copy: bool) -> None:
        flat = self.flat_parameters()
        checkpoint.unpack(self.component_states(), entry, replicated, device=flat.device,
                          current_layout=flat.layout.record(), universal=universal, copy=copy)
        self._steps = int(entry.get(checkpoint.STEP_KEY, 0))
        for part in self.components.values():
            loaded = getattr(part, "loaded", None)
            if loaded is not None:
                loaded()
        self._materialized = False
        self._prepare()

    def curvature_stats(self) -> dict[str, Any]:
        """The latest eigenvalues, subspace gradient fraction, refresh time, HVP strategy and cost, trust
        scale and ADMM extrapolation norm, as plain numbers (read from the device here, not in the step)."""
        stats = {k: v for k, v in self.tracker.stats.items() if not k.endswith("_partial")}
        stats.update(self.admm.stats)
        for key, value in self._step_stats.items():
            if isinstance(value, hybrid.Finish):
                value = hybrid.trust_scale(value)
            elif isinstance(value, tuple):  # (coefficients, ||g||^2): ||V g|| / ||g||
                value = float(value[0].norm() / value[1].clamp_min(1e-300).sqrt())
            stats[key] = float(value) if torch.is_tensor(value) else value
        if self.tracker.chooser.report:
            stats["hvp_report"] = self.tracker.chooser.report
        return stats

    @property
    def stats(self) -> dict[str, Any]:
        """Alias of :meth:`curvature_stats`."""
        return self.curvature_stats()


def _rank_within(config: DHO2Config, total: int) -> DHO2Config:
    """``config`` with ``rank`` (or ``max_rank``) and the Lanczos order lowered to the number of parameters,
    with a warning."""
    if config.rank_limit <= total:
        return config
    key = "max_rank" if config.adaptive_rank else "rank"
    logger.warning("DHO2 %s=%d exceeds the %d trainable parameters; using %s=%d.", key, config.rank_limit, total,
                   key, total)
    return DHO2Config(**{**config.to_dict(), key: total, "lanczos_order": min(config.lanczos_order, total)})
