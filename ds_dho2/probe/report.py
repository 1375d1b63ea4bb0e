"""The probe's verdict in plain words, the thresholds it rests on, and the report that carries both.

The verdict follows docs/design.md, "Where hybrid order pays": steps to a target follow
``S = S_min (1 + B_noise / B)`` (McCandlish et al. 2018), and curvature changes only ``S_min``. So:

1. **noise-limited** when the batch ``B`` is below the noise scale: most steps are spent averaging noise,
   which no curvature step removes. When the training set's size ``N`` is known, batches are drawn
   without replacement and the noise of a batch mean shrinks by ``1 - B/N`` (the finite-population
   correction), so the scale compared with ``B`` is ``B_noise (1 - B/N)``: a full batch has none;
2. otherwise **curvature-limited** when the base optimizer's ``lr x lambda_max`` (in its own metric)
   is near its stability limit: the sharpest directions hold the learning rate down, which is what a
   Newton step in their subspace (and, with the heavy-ball base, a larger step in the rest) can change;
   with outliers above the bulk, DHO2 at that rank is the recommendation;
3. otherwise **lr-limited**: neither noise nor curvature holds the run back, and the learning rate can
   simply be raised.

The thresholds:

* :data:`OUTLIER_GAP` = 3: an eigenvalue is an outlier when it is at least 3 times the next one
  (:func:`ds_dho2.probe.measures.outlier_count` takes the last such gap among the top ``max_rank``). A
  smooth bulk has neighbour ratios near 1: a power law ``lambda_i ~ i^-a`` has its largest ratio,
  ``2^a``, at ``i = 1``, below 3 for ``a < 1.58``; the AdamW-preconditioned spectra of the char-LM and
  SST-2 runs of the subspace benchmark, which show no outliers, have ``lambda_1 / lambda_5 = 2.2-2.8``
  over four neighbours (about 1.2-1.3 per neighbour). A
  factor of 3 is also where a Newton step along a direction starts to differ much from the base step,
  whose learning rate is set by the direction above it.
* :data:`NOISE_BATCH_RATIO` = 1: noise-limited when ``B < B_noise``. At ``B = B_noise`` noise and
  curvature account for equal shares of the steps (``S = 2 S_min``, the critical batch of McCandlish et
  al.); below it, even a curvature step that made ``S_min`` vanish would save less than half the
  steps, and in practice the subspace benchmark's noise-limited runs saved none.
* :data:`STABILITY_FRACTION` = 0.5: curvature-limited when ``lr x lambda_max`` is at least half of the
  stability limit. Training at a tuned learning rate sits at the edge of stability (Cohen et al. 2021:
  ``lr x lambda_max`` about at the limit for full-batch training), and within a factor 2 of it the sharp
  directions decide the usable learning rate. The noise-limited runs of the subspace benchmark sat at
  5-26% of AdamW's limit (1.8-10 of 38).
* :data:`EIGENVALUE_FLOOR` = 1e-4 (DHO2's ``eig_floor``): eigenvalues below this share of the largest
  count as zero in the outlier rule, as DHO2 drops them from its subspace; float32 products put the
  exact zeros of a low-rank Hessian (a batch smaller than the parameter count) near 1e-7 of it.
* :data:`DEFAULT_RANK`: DHO2's default rank, the subspace the share and the cost are given for when the
  spectrum has no outliers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ds_dho2.core import spectrum
from ds_dho2.config import DHO2Config

OUTLIER_GAP = spectrum.OUTLIER_GAP
NOISE_BATCH_RATIO = 1.0
STABILITY_FRACTION = 0.5
EIGENVALUE_FLOOR = float(DHO2Config.model_fields["eig_floor"].default)
DEFAULT_RANK = int(DHO2Config.model_fields["rank"].default)
#: DHO2's default refresh interval, over which a refresh's products are amortised in the cost estimate
REFRESH_INTERVAL = int(DHO2Config.model_fields["refresh_interval"].default)

NOISE_LIMITED = "noise-limited"
CURVATURE_LIMITED = "curvature-limited"
LR_LIMITED = "lr-limited"
UNDETERMINED = "undetermined"


@dataclasses.dataclass
class ProbeReport:
    """Everything a probe measured, its verdict, and how it was measured.

    Spectrum: ``eigenvalues`` (the top ``max_rank + 1`` Hessian eigenvalues by magnitude, Lanczos Ritz
    values), ``outliers`` (how many stand above the bulk: the rank DHO2 should use), ``outlier_gap``
    (``|lambda_N| / |lambda_{N+1}|`` at that count, or the largest neighbour ratio when there are none).
    Base step: ``subspace_rank`` and ``subspace_share`` (``||V V^T d|| / ||d||`` of the last step ``d`` in
    the top ``subspace_rank`` eigenvectors). Stability: ``metric_lambda_max`` (the top eigenvalue in the
    base optimizer's metric), ``lr_lambda_max``, ``stability_limit`` and their ``stability_ratio``. Noise:
    ``noise_scale`` (``B_noise``, examples; ``inf`` when the batch did not resolve the mean gradient),
    ``trace_sigma``, ``grad_sq``, ``noise_chunks`` x ``chunk_size``; ``batch_noise_scale`` is
    ``B_noise (1 - B/N)`` with ``N = dataset_size`` (``B_noise`` when the size is unknown), the scale the
    ``batch_size`` is compared with. Cost:
    ``step_cost`` (DHO2's extra time per step as a fraction of a step) from ``projection_seconds``,
    ``product_seconds``, ``step_seconds``. ``regime`` is one of ``noise-limited``, ``curvature-limited``,
    ``lr-limited``, ``undetermined``; ``verdict`` says it in words; ``notes`` lists what could not be
    measured and why. Quantities that were not measured are None.
    """

    step: int | None
    parameters: int
    loss: float
    optimizer: str
    base: str | None
    lr: float
    batch_size: float | None
    dataset_size: float | None
    max_rank: int
    eigenvalues: list[float]
    lanczos_products: int
    outliers: int
    outlier_gap: float | None
    subspace_rank: int
    subspace_share: float | None
    metric: str
    metric_lambda_max: float | None
    lr_lambda_max: float | None
    stability_limit: float | None
    stability_ratio: float | None
    noise_scale: float | None
    batch_noise_scale: float | None
    trace_sigma: float | None
    grad_sq: float | None
    noise_chunks: int | None
    chunk_size: float | None
    gradient_seconds: float | None
    product_seconds: float | None
    projection_seconds: float | None
    step_seconds: float | None
    step_cost: float | None
    regime: str = UNDETERMINED
    verdict: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def recommended_rank(self) -> int | None:
        """The rank DHO2 should use (the outlier count), or None when nothing stands above the bulk."""
        return self.outliers or None

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON values (an infinite value is the string ``"inf"``, NaN is None)."""
        def plain(value: Any) -> Any:
            if isinstance(value, float):
                if math.isnan(value):
                    return None
                if math.isinf(value):
                    return "inf" if value > 0 else "-inf"
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        out = {field.name: plain(getattr(self, field.name)) for field in dataclasses.fields(self)}
        out["recommended_rank"] = self.recommended_rank
        return out

    def __str__(self) -> str:
        lines = [f"DHO2 probe{'' if self.step is None else f' at step {self.step}'}: {self.parameters:,} parameters, "
                 f"batch {_number(self.batch_size)}, {self.optimizer} lr {self.lr:.3g}, loss {self.loss:.4g}"]
        top = ", ".join(f"{v:.4g}" for v in self.eigenvalues[: min(len(self.eigenvalues), 8)])
        lines.append(f"  Hessian top eigenvalues (by |lambda|, {self.lanczos_products} Lanczos products): {top}"
                     f"{', ...' if len(self.eigenvalues) > 8 else ''}")
        if self.outliers:
            lines.append(f"  outliers above the bulk: {self.outliers} (|lambda_{self.outliers}| / "
                         f"|lambda_{self.outliers + 1}| = {_number(self.outlier_gap, '.3g')})")
        else:
            lines.append(f"  outliers above the bulk: none among the top {self.max_rank} (largest neighbour ratio "
                         f"{_number(self.outlier_gap, '.3g')} < {OUTLIER_GAP:g})")
        if self.subspace_share is not None:
            lines.append(f"  last step inside the top-{self.subspace_rank} subspace: {self.subspace_share:.1%} "
                         "(||V V^T d|| / ||d||)")
        if self.lr_lambda_max is not None:
            lines.append(f"  lr x lambda_max in {self.metric}: {self.lr_lambda_max:.3g} (stability limit "
                         f"{self.stability_limit:.3g}: {_percent(self.stability_ratio)} of it)")
        if self.noise_scale is not None:
            size = _number(self.chunk_size * self.noise_chunks) if self.chunk_size and self.noise_chunks else "?"
            value = (f"~{_count(self.noise_scale)} examples" if math.isfinite(self.noise_scale) else
                     f"above {size} examples (the mean gradient was not resolved from the noise)")
            lines.append(f"  gradient noise scale B_noise = tr(Sigma) / |G|^2: {value} (from {self.noise_chunks} "
                         f"chunks of {_number(self.chunk_size)}), batch {_number(self.batch_size)}")
            if self.dataset_size and self.batch_noise_scale is not None:
                lines.append(f"  drawn from {_count(self.dataset_size)} examples: B_noise (1 - B/N) = "
                             f"{_number(self.batch_noise_scale, '.4g')}")
        if self.step_cost is not None:
            lines.append(f"  DHO2 cost: ~{self.step_cost:.0%} per step at rank {self.subspace_rank} (projection "
                         f"{_ms(self.projection_seconds)}, {2 * self.subspace_rank} products of "
                         f"{_ms(self.product_seconds)} every {REFRESH_INTERVAL} steps, step "
                         f"{_ms(self.step_seconds)})")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _number(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return format(value, spec)


def _count(value: float) -> str:
    """An example count: whole numbers from 100 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _percent(fraction: float) -> str:
    """A share in percent, with two significant digits below 10%."""
    return f"{fraction:.0%}" if abs(fraction) >= 0.1 else f"{fraction * 100:.2g}%"


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _cost_words(step_cost: float | None) -> str:
    return ("DHO2's cost per step was not measured" if step_cost is None
            else f"DHO2 will cost ~{max(step_cost, 0.0):.0%} per step")


def batch_noise_scale(noise_scale: float | None, batch_size: float | None,
                      dataset_size: float | None) -> float | None:
    """``B_noise (1 - B/N)``: the noise scale a batch of ``B`` drawn without replacement from ``N`` examples
    meets (``B_noise`` when ``N`` is unknown; 0 for a full batch, whatever ``B_noise`` is)."""
    if noise_scale is None or batch_size is None or not dataset_size:
        return noise_scale
    correction = max(0.0, 1.0 - float(batch_size) / float(dataset_size))
    return 0.0 if correction == 0.0 else noise_scale * correction


def judge(*, batch_size: float | None, noise_scale: float | None, noise_big_batch: float | None,
          stability_ratio: float | None, outliers: int, subspace_rank: int, lift: float | None,
          step_cost: float | None, max_rank: int, dataset_size: float | None = None) -> tuple[str, str]:
    """``(regime, verdict)`` from the measured quantities, by the rules of the module docstring.

    ``lift`` is ``|lambda_1| / |lambda_{k+1}|`` for the subspace rank ``k``: how far taking the top ``k``
    directions out of the base step's hands raises its stability limit. ``noise_big_batch`` is the
    largest batch the noise estimate used (the bound to quote when the noise scale came out infinite).
    ``dataset_size``: the training set's size, for the finite-population correction
    (:func:`batch_noise_scale`).
    """
    cost = _cost_words(step_cost)
    raw_noise_scale = noise_scale
    noise_scale = batch_noise_scale(noise_scale, batch_size, dataset_size)
    if noise_scale is not None and batch_size is not None and batch_size < NOISE_BATCH_RATIO * noise_scale:
        if math.isinf(noise_scale):
            about = (f"the gradient of a batch of {_number(noise_big_batch)} did not rise above its noise, so "
                     f"B_noise exceeds it")
        else:
            about = f"expect no step savings below a batch of about {_count(noise_scale)}"
            if dataset_size and raw_noise_scale is not None and math.isfinite(raw_noise_scale):
                about += (f" (B_noise {_count(raw_noise_scale)} x (1 - B/N) for a training set of "
                          f"{_count(float(dataset_size))})")
        return NOISE_LIMITED, f"noise-limited at batch {_number(batch_size)}: {about}; {cost}"
    if stability_ratio is None:
        unmeasured = "" if noise_scale is not None else " and the noise scale was not measured"
        return UNDETERMINED, ("undetermined: the base optimizer's stability limit is unknown (neither AdamW-like "
                              f"nor SGD / heavy-ball){unmeasured}; {cost}")
    if stability_ratio >= STABILITY_FRACTION:
        if outliers:
            return CURVATURE_LIMITED, (
                f"curvature-limited: DHO2 with base heavyball, rank {outliers} should save steps (lr x lambda_max is "
                f"{_percent(stability_ratio)} of the base optimizer's stability limit, and taking the top {outliers} "
                f"directions out of its hands lifts that limit by lambda_1 / lambda_{outliers + 1} = "
                f"{_number(lift, '.3g')}); {cost}")
        return CURVATURE_LIMITED, (
            f"curvature-limited, but no eigenvalue stands {OUTLIER_GAP:g}x above the next among the top "
            f"{max_rank}: a rank-{subspace_rank} subspace lifts the stability limit only by lambda_1 / "
            f"lambda_{subspace_rank + 1} = {_number(lift, '.3g')}, so expect little from DHO2; {cost}")
    if noise_scale is None:
        noise = ""
    elif noise_scale == 0.0:
        noise = f" and the batch {_number(batch_size)} is the whole training set (no sampling noise)"
    else:
        noise = f" and the batch {_number(batch_size)} is above the noise scale {_count(noise_scale)}"
    return LR_LIMITED, (
        f"lr-limited: lr x lambda_max is only {_percent(stability_ratio)} of the base optimizer's stability "
        f"limit{noise}; raise the learning rate before trying DHO2 (a curvature step cannot help while curvature does not hold "
        f"the base step back); {cost}")


__all__ = ["batch_noise_scale", "CURVATURE_LIMITED", "DEFAULT_RANK", "EIGENVALUE_FLOOR", "LR_LIMITED", "NOISE_BATCH_RATIO", "NOISE_LIMITED", "OUTLIER_GAP",
           "ProbeReport", "REFRESH_INTERVAL", "STABILITY_FRACTION", "UNDETERMINED", "judge"]
