"""Every point DHO2 patches or reads in DeepSpeed and Transformers is listed and checked: present in the
installed versions, and a missing one fails loudly, naming the point and the version."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import ds_dho2
from ds_dho2.integrations import patch_points
from ds_dho2.integrations.patch_points import IncompatibleVersionError

INTEGRATIONS = Path(ds_dho2.__file__).parent / "integrations"


@pytest.mark.parametrize("point", patch_points.DEEPSPEED + patch_points.TRANSFORMERS
                         + patch_points.UNIVERSAL_CONVERTER, ids=lambda p: p.path)
def test_every_listed_point_exists_in_the_installed_versions(point) -> None:
    assert patch_points.problem(point) is None


def test_a_missing_deepspeed_hook_fails_registration_naming_it_and_the_version(monkeypatch) -> None:
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    from ds_dho2.integrations.deepspeed import register

    monkeypatch.delattr(DeepSpeedEngine, "_backward_prologue_per_tensor")
    with pytest.raises(IncompatibleVersionError) as error:
        register()
    message = str(error.value)
    assert message.startswith(f"DHO2 does not work with the installed deepspeed {deepspeed.__version__}: "
                              "deepspeed.runtime.engine.DeepSpeedEngine._backward_prologue_per_tensor does not exist")
    assert "divided by gradient_accumulation_steps" in message and "DeepSpeed >=0.19,<0.20" in message


def test_a_changed_signature_is_a_missing_point(monkeypatch) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    monkeypatch.setattr(DeepSpeedEngine, "backward", lambda self, tensor, scale=1.0: None)
    with pytest.raises(IncompatibleVersionError, match=r"DeepSpeedEngine.backward takes \('self', 'tensor', "
                                                       r"'scale'\), DHO2 expects \('self', 'loss', 'retain_graph', "):
        patch_points.check(patch_points.DEEPSPEED, "DeepSpeed >=0.19,<0.20")


def test_a_missing_trainer_point_warns_and_patches_nothing(monkeypatch, caplog) -> None:
    import transformers.trainer
    import transformers.trainer_callback

    from ds_dho2.integrations.trainer_hook import patch_trainer_module

    monkeypatch.delattr(transformers.trainer_callback.TrainerCallback, "on_log")
    original = transformers.trainer.Trainer.__init__
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        patch_trainer_module(transformers.trainer)
    assert transformers.trainer.Trainer.__init__ is original
    assert "TrainerCallback.on_log does not exist" in caplog.text and "transformers" in caplog.text


def test_a_missing_converter_function_refuses_conversion(monkeypatch) -> None:
    import deepspeed.checkpoint.ds_to_universal as converter

    from ds_dho2.integrations.universal import UniversalConversionError, check_deepspeed

    monkeypatch.delattr(converter, "_merge_zero_shards")
    with pytest.raises(UniversalConversionError, match="_merge_zero_shards does not exist"):
        check_deepspeed()


def test_every_deepspeed_attribute_the_integration_replaces_is_listed() -> None:
    """``X.attr = ...`` and ``_wrap_once(X, "attr", ...)`` in the DeepSpeed glue must each have a list entry."""
    listed = {point.path.split(".")[-1] for point in patch_points.DEEPSPEED}
    tree = ast.parse((INTEGRATIONS / "deepspeed.py").read_text())
    assigned = {target.attr for node in ast.walk(tree) if isinstance(node, ast.Assign) for target in node.targets
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id in ("DeepSpeedEngine", "ds_config", "engine", "zero_optimizer")}
    wrapped = {node.args[1].value for node in ast.walk(tree) if isinstance(node, ast.Call)
               and isinstance(node.func, ast.Name) and node.func.id == "_wrap_once"
               and isinstance(node.args[1], ast.Constant)}
    assert {"backward", "_configure_optimizer", "load_checkpoint", "step"} <= assigned | wrapped
    assert assigned | wrapped <= listed | {"DHO2"}, (assigned | wrapped) - listed
