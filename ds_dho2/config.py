"""Validated configuration for DHO2.

One frozen pydantic model per concern (as DeepSpeed declares its own config). Each field's type and
``Field`` constraints are the single source of its default, its validation and its error message.
``DHO2Config.from_dict`` accepts the plain dict that appears as the ``"params"`` block of a DeepSpeed JSON
``optimizer`` entry (and the keyword arguments of :class:`ds_dho2.DHO2`). It and the constructors,
nested sections included, reject unknown keys, wrong types and out-of-range values with a
:class:`ConfigError` (never pydantic's ``ValidationError``) that names the key and what is allowed.
"""

from __future__ import annotations

import enum
import math
import types
from typing import Annotated, Any, ClassVar, Literal, Mapping, Union, get_args, get_origin

import annotated_types
from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic.fields import FieldInfo


class BaseOptimizer(str, enum.Enum):
    """First-order optimizer used on the complement of the curvature subspace."""

    ADAMW = "adamw"
    HEAVYBALL = "heavyball"


class HVPMethod(str, enum.Enum):
    """How Hessian-vector products are computed (see ``ds_dho2.hvp``).

    ``GRAPH`` takes the products on the gradient graph of the loss handed to ``engine.backward`` (no
    second forward, no loss function needed); the others replay the captured micro-batch. ``AUTO`` times
    the available ones on the first refresh and keeps the cheapest that agrees with an exact product.
    """

    AUTO = "auto"
    FORWARD = "forward"
    REVERSE = "reverse"
    FINITE_DIFFERENCE = "finite_difference"
    GRAPH = "graph"


class ADMMExtrapolation(str, enum.Enum):
    """How the window-end extrapolation moves the parameters (see ``ds_dho2.core.admm``)."""

    JUMP = "jump"
    SPREAD = "spread"
    CHECKED = "checked"


class CurvatureMode(str, enum.Enum):
    """``BLOCKING`` runs all Lanczos iterations at the refresh step; ``INTERLEAVED`` spreads them over steps."""

    BLOCKING = "blocking"
    INTERLEAVED = "interleaved"


#: the k of rank='auto' before the first refresh has measured the spectrum
AUTO_START_RANK = 4


class ConfigError(ValueError):
    """Raised for an invalid DHO2 configuration; the message names the key and what is allowed."""


# Field types. Strict, so that a bool never passes as a number and a string never as either.
Number = Annotated[float, Strict(), AllowInfNan(False)]  # an int is accepted (and stored as a float)
Count = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _list_or_tuple(value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ValueError("not a list or tuple")  # a set would silently reorder the pair
    return value


AnyCase = BeforeValidator(_lower)  # an enum field accepts its value in any case: "HeavyBall" -> HEAVYBALL
Beta = Annotated[Number, Field(ge=0.0, lt=1.0)]
Betas = Annotated[tuple[Beta, Beta], BeforeValidator(_list_or_tuple)]


def _invalid(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"Invalid DHO2 config value {key}={value!r}. Must be {allowed}.")


def _not_a_mapping(value: Any) -> ConfigError:
    return ConfigError(f"DHO2 params must be a mapping of key -> value, got {type(value).__name__}.")


class _Section(BaseModel):
    """What every section shares: frozen, unknown keys rejected, pydantic's errors raised as ConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _key: ClassVar[str] = ""  # where the section sits in a DHO2 config ("admm"); "" for the top level

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise _config_error(type(self), values, error) from None

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> "_Section":
        """pydantic's entry point, raising :class:`ConfigError` like the constructor."""
        try:
            return super().model_validate(obj, **options)
        except ValidationError as error:
            raise _config_error(cls, obj, error) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise self._frozen(name)

    def __delattr__(self, name: str) -> None:
        raise self._frozen(name)

    def _frozen(self, name: str) -> AttributeError:
        return AttributeError(f"Cannot change {type(self).__name__}.{name}: DHO2 configs are frozen. "
                              "Build a new one, e.g. DHO2Config.from_dict({**config.to_dict(), ...}).")


class ADMMConfig(_Section):
    """ADMM-like coupling of successive windows (docs/design.md, "ADMM").

    ``max_extrapolation_ratio`` is the overshoot safeguard: the window-end extrapolation ``y/rho`` is
    scaled down so that its global norm never exceeds ``max_extrapolation_ratio * ||x||``.
    ``dual_decay`` multiplies ``y`` after each window end (1.0 = the literal rule, where ``y/rho``
    accumulates every past window's displacement; 0.0 = extrapolate by the last window's displacement
    only). ``window=None`` means "the curvature refresh interval". ``extrapolation``: ``"spread"`` applies
    the extrapolation in equal parts over the next window (no jump at window ends), ``"jump"`` applies it
    at once (the literal rule), ``"checked"`` (the default) applies it at once only if the loss on the
    curvature batch does not rise, and falls back to ``"spread"`` when that loss cannot be re-evaluated.
    Disabled by default: in the convergence suite (3 seeds, W=2) enabling it raised the final validation
    loss on digits (0.1324 vs 0.1258 with curvature, 0.1185 vs 0.1021 without) and SST-2 (0.4662 vs 0.4386).
    """

    _key: ClassVar[str] = "admm"

    enabled: Flag = False  # off by default: over 3 seeds it raised the final loss on digits and SST-2
    rho: Number = Field(5e-9, gt=0.0)
    window: Count | None = Field(None, ge=1)
    max_extrapolation_ratio: Number = Field(0.05, ge=0.0)
    dual_decay: Number = Field(1.0, ge=0.0, le=1.0)
    extrapolation: Annotated[ADMMExtrapolation, AnyCase] = ADMMExtrapolation.CHECKED


class CurvatureConfig(_Section):
    """How the curvature tracker refreshes the eigenbasis (``ds_dho2.curvature``).

    ``enabled=False`` turns DHO2 into its base optimizer (optionally with ADMM), the ablation baseline.
    In ``interleaved`` mode ``iterations_per_step`` Lanczos iterations run per training step; ``None``
    (the default) spreads the ``lanczos_order`` iterations evenly over the ``refresh_interval`` steps of a
    window, so no step carries more than ``ceil(order / refresh_interval)`` of them.

    ``batch_fraction``: the share of each rank's micro-batch the replayed products see: every
    ``round(1 / batch_fraction)``-th sample, so the subset does not depend on the world size (the
    products on the training step's own graph always see the whole micro-batch). ``warm_start``: a refresh starts
    Lanczos from the previous eigenvectors plus ``warm_start_noise`` (relative norm) of a random vector;
    ``tolerance``: a refresh stops once every kept Ritz pair has residual ``<= tolerance * |lambda|``.
    ``max_interval``: the refresh interval grows (doubling, up to this) while the subspace barely rotates
    between refreshes and shrinks back towards ``refresh_interval`` when it rotates; ``None`` means
    ``4 * refresh_interval``, and ``max_interval == refresh_interval`` turns adaptation off.
    ``back_off``: when the curvature carried less than ``payoff_share`` of the predicted loss decrease since
    the last refresh (the Newton step's quadratic-model gain, plus what the heavy-ball boost adds), it sleeps
    (no basis, so each step is the base optimizer's) and wakes for a refresh every ``4 * max_interval``
    steps to look again: a refresh and its projections cost several per cent of a step, so a curvature that
    carries less than that only slows the run.
    """

    _key: ClassVar[str] = "curvature"

    enabled: Flag = True
    mode: Annotated[CurvatureMode, AnyCase] = CurvatureMode.BLOCKING
    iterations_per_step: Count | None = Field(None, ge=1)
    batch_fraction: Number = Field(0.25, gt=0.0, le=1.0)
    warm_start: Flag = True
    warm_start_noise: Number = Field(0.1, ge=0.0)
    tolerance: Number = Field(0.05, gt=0.0)
    max_interval: Count | None = Field(None, ge=1)
    back_off: Flag = True
    payoff_share: Number = Field(0.05, ge=0.0, lt=1.0)


class DHO2Config(_Section):
    """All DHO2 hyper-parameters; see the README for the meaning of each."""

    lr: Number = Field(1e-3, ge=0.0)
    betas: Betas = (0.9, 0.999)
    eps: Number = Field(1e-8, gt=0.0)
    weight_decay: Number = Field(0.0, ge=0.0)
    base: Annotated[BaseOptimizer, AnyCase] = BaseOptimizer.ADAMW
    momentum: Number = Field(0.9, ge=0.0, lt=1.0)
    rank: Annotated[int, Strict(), annotated_types.Ge(1)] | Literal["auto"] = Field(
        4, description="k, the eigenpairs in use; 'auto' follows the outliers of the spectrum up to max_rank.")
    max_rank: Count = Field(20, ge=1, description="The largest k rank='auto' may reach.")
    lanczos_order: Count | None = Field(None, ge=1, validate_default=True,
                                        description="At least rank; None means 2 * rank (2 * max_rank with "
                                                    "rank='auto', the most a refresh may run).")
    alpha: Number = Field(0.1, ge=0.0)
    newton_momentum: Number = Field(0.9, ge=0.0, lt=1.0)
    refresh_interval: Count = Field(50, ge=1)
    warmup_steps: Count | None = Field(None, ge=1, validate_default=True,
                                       description="None means refresh_interval.")
    lr_clip: Number | None = Field(None, ge=1.0, validate_default=True,
                                   description="None means 1.0 for base adamw, 3.0 for heavyball.")
    eig_floor: Number = Field(1e-4, ge=0.0, lt=1.0)
    newton_max_ratio: Number = Field(10.0, gt=0.0)
    hvp: Annotated[HVPMethod, AnyCase] = HVPMethod.AUTO
    lanczos_dtype: Literal["float64", "float32"] = "float32"
    max_nonfinite_steps: Count = Field(10, ge=1)
    divergence_growth: Number = Field(100.0, ge=1.0, description="A step's ||g||^2 above this multiple of its "
                                      "running mean, with curvature in use, drops the basis (checked every "
                                      "max_nonfinite_steps steps).")
    divergence_rollback: Flag = Field(True, description="With a boosted heavy-ball base, a divergence also puts "
                                      "back the parameters and momentum of the last basis install.")
    seed: Count = Field(0, ge=0)
    curvature: CurvatureConfig = Field(default_factory=CurvatureConfig,
                                       description="max_interval, when set, is at least refresh_interval.")
    admm: ADMMConfig = Field(default_factory=ADMMConfig)

    # Derived defaults and cross-field rules. A field validator sees the fields declared before it in
    # info.data (those that passed); one that is missing there is reported invalid already.
    @field_validator("lanczos_order")
    @classmethod
    def _order_covers_rank(cls, order: int | None, info: ValidationInfo) -> int | None:
        rank = info.data.get("rank")
        if rank == "auto":
            rank = info.data.get("max_rank")
        if rank is None:
            return order
        if order is None:
            return 2 * rank
        if order < rank and info.data.get("rank") != "auto":
            raise _invalid("lanczos_order", order, f"an integer >= rank ({rank})")
        return order

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_defaults_to_interval(cls, steps: int | None, info: ValidationInfo) -> int | None:
        return info.data.get("refresh_interval") if steps is None else steps

    @field_validator("lr_clip")
    @classmethod
    def _lr_clip_default_for_base(cls, clip: float | None, info: ValidationInfo) -> float | None:
        if clip is None:
            return 1.0 if info.data.get("base") is BaseOptimizer.ADAMW else 3.0
        return clip

    @field_validator("curvature")
    @classmethod
    def _max_interval_covers_refresh(cls, curvature: CurvatureConfig,
                                     info: ValidationInfo) -> CurvatureConfig:
        interval, longest = info.data.get("refresh_interval"), curvature.max_interval
        if interval is not None and longest is not None and longest < interval:
            raise _invalid("curvature.max_interval", longest, f"an integer >= refresh_interval ({interval})")
        return curvature

    @model_validator(mode="after")
    def _interleaved_schedule_fits(self) -> "DHO2Config":
        """An interleaved refresh must finish its Lanczos iterations within one refresh interval."""
        per_step = self.curvature.iterations_per_step
        if self.curvature.mode is CurvatureMode.INTERLEAVED and per_step is not None:
            steps_needed = math.ceil(self.lanczos_order / per_step)
            if steps_needed > self.refresh_interval:
                raise ConfigError(
                    f"Invalid interleaved curvature schedule: lanczos_order={self.lanczos_order} at "
                    f"curvature.iterations_per_step={per_step} takes {steps_needed} steps, more than "
                    f"refresh_interval={self.refresh_interval}. "
                    "Raise iterations_per_step or refresh_interval.")
        return self

    @property
    def adaptive_rank(self) -> bool:
        """``rank='auto'``: k follows the outliers of the spectrum between refreshes."""
        return self.rank == "auto"

    @property
    def start_rank(self) -> int:
        """The k of the first refresh: ``rank``, or :data:`AUTO_START_RANK` (at most ``max_rank``) with 'auto'."""
        return min(AUTO_START_RANK, self.max_rank) if self.adaptive_rank else int(self.rank)

    @property
    def rank_limit(self) -> int:
        """The largest k this config can use."""
        return self.max_rank if self.adaptive_rank else int(self.rank)

    @property
    def max_refresh_interval(self) -> int:
        """The longest interval the adaptive schedule may reach (``curvature.max_interval``)."""
        configured = self.curvature.max_interval
        return configured if configured is not None else 4 * self.refresh_interval

    @property
    def admm_window(self) -> int:
        """The ADMM window length in steps (defaults to the refresh interval)."""
        return self.admm.window if self.admm.window is not None else self.refresh_interval

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> "DHO2Config":
        """Build from a plain dict (a DeepSpeed ``"params"`` block); rejects unknown keys."""
        if not isinstance(params, Mapping):
            raise _not_a_mapping(params)
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form (enums as strings, betas as a list)."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------- pydantic errors -> ConfigError
def _config_error(model: type[_Section], values: Any, error: ValidationError) -> ConfigError:
    """The one error a user sees: unknown keys first (this section's, then a nested one's), else the first
    bad value in field order, with what is allowed read from that field's declaration.

    A nested section validates a dict through its own ``__init__``, so its error arrives here already
    translated, as the cause of a ``value_error``; so do those the validators above raise.
    """
    problems = error.errors()
    unknown = sorted(str(p["loc"][-1]) for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        where = f" in {model._key!r}" if model._key else ""
        return ConfigError(
            f"Unknown DHO2 config key{'s' if len(unknown) > 1 else ''}{where}: "
            f"{', '.join(map(repr, unknown))}. Allowed keys: {', '.join(sorted(model.model_fields))}.")
    causes = [p.get("ctx", {}).get("error") for p in problems]
    nested_unknown = [c for c in causes if isinstance(c, ConfigError) and str(c).startswith("Unknown DHO2 config key")]
    if nested_unknown:
        return nested_unknown[0]
    if isinstance(causes[0], ConfigError):
        return causes[0]
    if not problems[0]["loc"]:  # the whole input, e.g. model_validate(3)
        return _not_a_mapping(values)
    name = problems[0]["loc"][0]
    field = model.model_fields[name]
    return _invalid(f"{model._key}.{name}" if model._key else name, values[name],
                    _allowed(field.annotation, field.metadata))


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, _Section)


def _allowed(annotation: Any, constraints: list[Any]) -> str:
    """What a field accepts, in words, from its declared type and constraints ("an integer >= 1")."""
    literals = [arg for arg in get_args(annotation) if get_origin(arg) is Literal] \
        if get_origin(annotation) in (Union, types.UnionType) else []
    if literals:  # a number or a keyword, e.g. rank: an integer >= 1 or 'auto'
        number = next(arg for arg in get_args(annotation) if get_origin(arg) is not Literal)
        return _allowed(number, constraints) + " or " + " or ".join(repr(v) for lit in literals for v in get_args(lit))
    kind, constraints = _bare(annotation, constraints)
    if kind is bool:
        return "true or false"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in kind)
    if _is_section(kind):
        return "a mapping with keys " + ", ".join(kind.model_fields)
    if get_origin(kind) is Literal:
        return " or ".join(map(repr, get_args(kind)))
    if get_origin(kind) is tuple and len(get_args(kind)) == 2:
        return f"a pair of numbers in {_interval(_bare(get_args(kind)[0], [])[1])}"
    bounds = " and ".join(f"{sign} {limit:g}" for sign, limit in _bounds(constraints))
    return ("an integer" if kind is int else "a finite number") + (f" {bounds}" if bounds else "")


def _bare(annotation: Any, constraints: list[Any]) -> tuple[Any, list[Any]]:
    """Strip ``Optional`` and ``Annotated`` from a type, collecting the constraints found on the way."""
    constraints = list(constraints)
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                constraints += item.metadata if isinstance(item, FieldInfo) else [item]
        elif get_origin(annotation) in (Union, types.UnionType):
            annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
        else:
            return annotation, constraints


_SIGNS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
          (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def _bounds(constraints: list[Any]) -> list[tuple[str, float]]:
    """``(sign, limit)`` of each bound, lower bounds first: ``[(">=", 0), ("<", 1)]``."""
    return [(sign, getattr(item, attr)) for kind, attr, sign in _SIGNS for item in constraints
            if isinstance(item, kind)]


def _interval(constraints: list[Any]) -> str:
    """Interval notation for a lower and an upper bound: ``[0, 1)``."""
    (low_sign, low), (high_sign, high) = _bounds(constraints)
    return f"{'[' if low_sign == '>=' else '('}{low:g}, {high:g}{']' if high_sign == '<=' else ')'}"
