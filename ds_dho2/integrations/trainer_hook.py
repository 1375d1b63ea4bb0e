"""Every Hugging Face ``Trainer`` gets DHO2's curvature statistics in its logs, with no change to the script.

``import ds_dho2`` calls :func:`install`. When transformers is installed, ``transformers.Trainer.__init__``
is wrapped so that each new Trainer puts a :class:`~ds_dho2.integrations.hf.DHO2CurvatureCallback` first in
its callback list (:func:`ds_dho2.integrations.hf.ensure_curvature_callback`), before the reporters
(TensorBoard, W&B, ...) and the console printer, so they all see the ``dho2/*`` entries. The callback does
nothing when the Trainer's optimizer turns out not to be DHO2, and a script that registers one itself
(``add_curvature_callback``, or ``Trainer(callbacks=[DHO2CurvatureCallback()])``) still ends up with exactly
one. ``trainer.remove_callback(DHO2CurvatureCallback)`` takes it out.

transformers is not imported here (it takes seconds): if ``transformers.trainer`` is already imported it is
patched now, otherwise a one-shot import hook patches it right after it is first imported, whichever of
``ds_dho2`` and ``transformers`` a script imports first (``ds-dho2 run`` imports ``ds_dho2`` before the
script runs).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
import threading
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

TRAINER_MODULE = "transformers.trainer"
SUPPORTED_VERSIONS = "transformers >=5.0,<6"
_MARKER = "_ds_dho2_curvature_callback"
_lock = threading.Lock()


def install() -> None:
    """Patch ``transformers.Trainer`` now or as soon as it is imported (idempotent; a no-op without
    transformers)."""
    try:
        if importlib.util.find_spec("transformers") is None:
            return
    except (ImportError, ValueError):
        return
    with _lock:
        module = sys.modules.get(TRAINER_MODULE)
        if module is not None and hasattr(module, "Trainer"):
            patch_trainer_module(module)
        elif not any(isinstance(finder, _TrainerImportHook) for finder in sys.meta_path):
            sys.meta_path.insert(0, _TrainerImportHook())


def patch_trainer_module(module: ModuleType) -> None:
    """Wrap ``module.Trainer.__init__`` so that every Trainer ends with one curvature callback, first.

    The patch points are checked first (:data:`~ds_dho2.integrations.patch_points.TRANSFORMERS`): with a
    transformers release that lacks one, a warning names it and the version, and no Trainer is patched."""
    from ds_dho2.integrations import patch_points

    try:
        patch_points.check(patch_points.TRANSFORMERS, SUPPORTED_VERSIONS)
    except patch_points.IncompatibleVersionError as error:
        logger.warning("%s The dho2/* statistics will not reach the Trainer's logs.", error)
        return
    trainer_cls = module.Trainer
    original = trainer_cls.__init__
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            from ds_dho2.integrations.hf import ensure_curvature_callback

            ensure_curvature_callback(self)
        except Exception:  # noqa: BLE001 - logging statistics must never break a Trainer
            logger.debug("DHO2 could not add its curvature callback to the Trainer.", exc_info=True)

    setattr(__init__, _MARKER, True)
    trainer_cls.__init__ = __init__


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.trainer``, then patches the module and steps aside."""

    def __init__(self, loader: Any, hook: "_TrainerImportHook") -> None:
        self.loader, self.hook = loader, hook

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.hook.remove()
        patch_trainer_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that only answers for ``transformers.trainer``, once."""

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TRAINER_MODULE or self._searching:
            return None
        self._searching = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, self)
        return spec

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


__all__ = ["install", "patch_trainer_module"]
