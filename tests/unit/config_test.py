"""Configuration validation: every invalid key or value raises ConfigError naming it."""

from __future__ import annotations

import re

import pydantic
import pytest
import torch

from ds_dho2 import DHO2, ADMMConfig, ConfigError, CurvatureConfig, DHO2Config

INVALID = [
    # (overrides, key named in the message)
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"betas": (0.9,)}, "betas"),
    ({"betas": (0.9, 0.99, 0.999)}, "betas"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, -0.1)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.01}, "weight_decay"),
    ({"base": "lamb"}, "base"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"rank": 0}, "rank"),
    ({"rank": True}, "rank"),
    ({"rank": 4.0}, "rank"),
    ({"rank": 8, "lanczos_order": 4}, "lanczos_order"),
    ({"alpha": -0.5}, "alpha"),
    ({"newton_momentum": 1.0}, "newton_momentum"),
    ({"refresh_interval": 0}, "refresh_interval"),
    ({"warmup_steps": 0}, "warmup_steps"),
    ({"lr_clip": 0.5}, "lr_clip"),
    ({"eig_floor": 1.0}, "eig_floor"),
    ({"eig_floor": -1e-3}, "eig_floor"),
    ({"newton_max_ratio": 0.0}, "newton_max_ratio"),
    ({"newton_max_ratio": float("inf")}, "newton_max_ratio"),
    ({"hvp": "backward"}, "hvp"),
    ({"lanczos_dtype": "float16"}, "lanczos_dtype"),
    ({"seed": -1}, "seed"),
    ({"admm": {"rho": 0.0}}, "admm.rho"),
    ({"admm": {"rho": -1.0}}, "admm.rho"),
    ({"admm": {"window": 0}}, "admm.window"),
    ({"admm": {"max_extrapolation_ratio": -0.1}}, "admm.max_extrapolation_ratio"),
    ({"admm": {"enabled": "yes"}}, "admm.enabled"),
    ({"admm": {"dual_decay": 1.5}}, "admm.dual_decay"),
    ({"curvature": {"mode": "async"}}, "curvature.mode"),
    ({"curvature": {"iterations_per_step": 0}}, "curvature.iterations_per_step"),
    ({"curvature": {"enabled": 1}}, "curvature.enabled"),
    ({"curvature": {"batch_fraction": 0.0}}, "curvature.batch_fraction"),
    ({"curvature": {"batch_fraction": 1.5}}, "curvature.batch_fraction"),
    ({"curvature": {"warm_start": "yes"}}, "curvature.warm_start"),
    ({"curvature": {"warm_start_noise": -0.1}}, "curvature.warm_start_noise"),
    ({"curvature": {"tolerance": 0.0}}, "curvature.tolerance"),
    ({"curvature": {"max_interval": 0}}, "curvature.max_interval"),
    ({"refresh_interval": 50, "curvature": {"max_interval": 20}}, "curvature.max_interval"),
    ({"max_nonfinite_steps": 0}, "max_nonfinite_steps"),
    ({"curvature": "blocking"}, "curvature"),
    ({"admm": 3}, "admm"),
]

UNKNOWN = [
    ({"learning_rate": 1e-3}, "learning_rate"),
    ({"admm": {"enabled": True, "beta": 0.1}}, "beta"),
    ({"curvature": {"interval": 10}}, "interval"),
]


def _allowed(cls: type) -> str:
    names = sorted(cls.model_fields)
    assert {"lr", "rank", "admm"} <= set(names) or {"enabled", "rho", "window"} <= set(names)
    return ", ".join(names)


def _named(key: str) -> str:
    return rf"(?<![\w.]){re.escape(key)}(?![\w])"


@pytest.mark.parametrize("overrides, key", INVALID + UNKNOWN, ids=[k for _, k in INVALID + UNKNOWN])
def test_invalid_config_raises_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=_named(key)):
        DHO2Config.from_dict(overrides)


@pytest.mark.parametrize("overrides, key", INVALID, ids=[k for _, k in INVALID])
def test_dho2_constructor_raises_the_same_errors(overrides, key):
    with pytest.raises(ConfigError) as from_dict:
        DHO2Config.from_dict(overrides)
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ConfigError, match=re.escape(str(from_dict.value))):
        DHO2([param], **overrides)


@pytest.mark.parametrize("overrides, key", UNKNOWN, ids=[k for _, k in UNKNOWN])
def test_from_config_rejects_unknown_keys(overrides, key):
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ConfigError, match=_named(key)):
        DHO2.from_config([param], overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"lr": -0.001}, "Invalid DHO2 config value lr=-0.001. Must be a finite number >= 0."),
    ({"rank": 0}, "Invalid DHO2 config value rank=0. Must be an integer >= 1 or 'auto'."),
    ({"rank": True}, "Invalid DHO2 config value rank=True. Must be an integer >= 1 or 'auto'."),
    ({"rank": "adaptive"}, "Invalid DHO2 config value rank='adaptive'. Must be an integer >= 1 or 'auto'."),
    ({"rank": 8, "lanczos_order": 4}, "Invalid DHO2 config value lanczos_order=4. Must be an integer >= rank (8)."),
    ({"base": "lamb"}, "Invalid DHO2 config value base='lamb'. Must be one of 'adamw', 'heavyball'."),
    ({"betas": (0.9,)}, "Invalid DHO2 config value betas=(0.9,). Must be a pair of numbers in [0, 1)."),
    ({"momentum": 1.0}, "Invalid DHO2 config value momentum=1.0. Must be a finite number >= 0 and < 1."),
    ({"admm": {"rho": 0.0}}, "Invalid DHO2 config value admm.rho=0.0. Must be a finite number > 0."),
    ({"curvature": {"mode": "async"}},
     "Invalid DHO2 config value curvature.mode='async'. Must be one of 'blocking', 'interleaved'."),
    ({"lanczos_dtype": "float16"},
     "Invalid DHO2 config value lanczos_dtype='float16'. Must be 'float64' or 'float32'."),
    ({"learning_rate": 1}, "Unknown DHO2 config key: 'learning_rate'. Allowed keys: "
     f"{_allowed(DHO2Config)}."),
    ({"admm": {"beta": 1, "gamma": 2}}, "Unknown DHO2 config keys in 'admm': 'beta', 'gamma'. Allowed keys: "
     f"{_allowed(ADMMConfig)}."),
    ({"curvature": {"interval": 1}}, "Unknown DHO2 config key in 'curvature': 'interval'. Allowed keys: "
     "back_off, batch_fraction, enabled, iterations_per_step, max_interval, mode, payoff_share, tolerance, "
     "warm_start, warm_start_noise."),
])
def test_exact_messages(overrides, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        DHO2Config.from_dict(overrides)


@pytest.mark.parametrize("params", [[("lr", 1e-3)], "lr=1e-3", 3, None])
def test_non_mapping_params_rejected(params):
    with pytest.raises(ConfigError, match=re.escape("DHO2 params must be a mapping of key -> value, got ")):
        DHO2Config.from_dict(params)


def test_valid_config_defaults_and_round_trip():
    config = DHO2Config.from_dict({"rank": 4, "base": "HeavyBall", "curvature": {"mode": "interleaved"}})
    assert config.lanczos_order == 8 and config.warmup_steps == config.refresh_interval == 50
    assert config.lanczos_dtype == "float32" and config.max_refresh_interval == 200
    defaults = DHO2Config()
    assert defaults.rank == 4 and defaults.newton_max_ratio == 10.0
    assert not defaults.admm.enabled and defaults.admm.extrapolation.value == "checked" and defaults.admm_window == 50
    assert config.lr_clip == 3.0 and config.base.value == "heavyball"
    assert DHO2Config.from_dict(config.to_dict()) == config
    assert DHO2Config.from_dict({}).lr_clip == 1.0


def test_param_groups_differing_in_lr_raise_value_error_naming_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"\['lr'\]") as error:
        DHO2([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}], lr=1e-3)
    assert not isinstance(error.value, ConfigError)
    # Differing only in weight decay is fine.
    DHO2([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-3)


def test_same_parameter_twice_rejected():
    a = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="same parameter twice"):
        DHO2([{"params": [a]}, {"params": [a]}])


def test_interleaved_schedule_too_slow_raises():
    param = torch.nn.Parameter(torch.zeros(64))
    message = ("Invalid interleaved curvature schedule: lanczos_order=32 at curvature.iterations_per_step=1 takes "
               "32 steps, more than refresh_interval=10.")
    with pytest.raises(ValueError, match=re.escape(message)):
        DHO2([param], rank=8, lanczos_order=32, refresh_interval=10,
             curvature={"mode": "interleaved", "iterations_per_step": 1})
    # Fast enough: 32 iterations at 4 per step take 8 <= 10 steps.
    DHO2([param], rank=8, lanczos_order=32, refresh_interval=10,
         curvature={"mode": "interleaved", "iterations_per_step": 4})


@pytest.mark.parametrize("overrides, message", [
    ({"rank": 0}, "Invalid DHO2 config value rank=0. Must be an integer >= 1 or 'auto'."),
    ({"curvature": {"mode": "async"}},
     "Invalid DHO2 config value curvature.mode='async'. Must be one of 'blocking', 'interleaved'."),
    ({"admm": {"beta": 1, "gamma": 2}}, "Unknown DHO2 config keys in 'admm': 'beta', 'gamma'. Allowed keys: "
     f"{_allowed(ADMMConfig)}."),
    ({"learning_rate": 1}, "Unknown DHO2 config key: 'learning_rate'. Allowed keys: "
     f"{_allowed(DHO2Config)}."),
])
def test_direct_construction_raises_config_error_not_pydantic(overrides, message):
    for build in (lambda: DHO2Config(**overrides), lambda: DHO2Config.model_validate(overrides)):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$") as error:
            build()
        assert not isinstance(error.value, pydantic.ValidationError)
        assert error.value.__cause__ is None and error.value.__suppress_context__
    with pytest.raises(ConfigError, match=re.escape("Invalid DHO2 config value curvature.mode='x'.")):
        CurvatureConfig(mode="x")


def test_unknown_keys_are_reported_before_values_and_values_in_field_order():
    with pytest.raises(ConfigError, match=r"^Unknown DHO2 config key in 'admm': 'beta'\."):
        DHO2Config.from_dict({"rank": 0, "admm": {"beta": 1, "rho": 0.0}})
    with pytest.raises(ConfigError, match=r"^Unknown DHO2 config key: 'zz'\."):
        DHO2Config.from_dict({"zz": 1, "admm": {"beta": 1}})
    with pytest.raises(ConfigError, match=r"^Invalid DHO2 config value momentum=1\.0\."):
        DHO2Config.from_dict({"seed": -1, "rank": 0, "momentum": 1.0})


def test_interleaved_schedule_checked_by_the_config():
    message = ("Invalid interleaved curvature schedule: lanczos_order=32 at curvature.iterations_per_step=1 "
               "takes 32 steps, more than refresh_interval=10. "
               "Raise iterations_per_step or refresh_interval.")
    params = {"rank": 8, "lanczos_order": 32, "refresh_interval": 10,
              "curvature": {"mode": "interleaved", "iterations_per_step": 1}}
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        DHO2Config.from_dict(params)
    # ceil(32 / 3) = 11 steps do not fit either; 32 at 4 per step take 8 <= 10; blocking mode has no limit.
    with pytest.raises(ConfigError, match="takes 11 steps"):
        DHO2Config.from_dict({**params, "curvature": {"mode": "interleaved", "iterations_per_step": 3}})
    assert DHO2Config.from_dict({**params, "curvature": {"mode": "interleaved", "iterations_per_step": 4}})
    assert DHO2Config.from_dict({**params, "curvature": {"mode": "blocking", "iterations_per_step": 1}})


def test_config_is_frozen_and_hashable():
    config = DHO2Config(rank=3)
    for change in (lambda: setattr(config, "rank", 5), lambda: delattr(config, "lr"),
                   lambda: setattr(config.curvature, "mode", "interleaved")):
        with pytest.raises(AttributeError, match="frozen"):
            change()
    assert config.rank == 3 and config.curvature.mode.value == "blocking" and config.lr == 1e-3
    assert hash(config) == hash(DHO2Config(rank=3)) and len({config, DHO2Config(rank=3), DHO2Config()}) == 2
    assert config.betas == (0.9, 0.999) and all(type(b) is float for b in DHO2Config(betas=[0, 0.5]).betas)


def test_json_schema_exposes_the_constraints():
    schema = DHO2Config.model_json_schema()
    fields = schema["properties"]
    integer, auto = fields["rank"]["anyOf"]
    assert integer == {"minimum": 1, "type": "integer"} and auto["const"] == "auto"
    assert fields["max_rank"]["minimum"] == 1
    assert fields["momentum"]["minimum"] == 0 and fields["momentum"]["exclusiveMaximum"] == 1
    assert fields["eps"]["exclusiveMinimum"] == 0
    assert fields["lanczos_dtype"]["enum"] == ["float64", "float32"]
    assert schema["additionalProperties"] is False
    admm = schema["$defs"]["ADMMConfig"]
    assert admm["additionalProperties"] is False and admm["properties"]["rho"]["exclusiveMinimum"] == 0
