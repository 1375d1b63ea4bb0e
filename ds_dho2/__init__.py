"""ds_dho2: a distributed hybrid-order optimizer (Newton in the top-k Hessian subspace, AdamW elsewhere)
that DeepSpeed builds from ``"optimizer": {"type": "DHO2"}`` with ZeRO-partitioned curvature state."""

from ds_dho2.config import ADMMConfig, ConfigError, CurvatureConfig, DHO2Config
from ds_dho2.curvature import estimate_top_eigenpairs
from ds_dho2.logging_utils import add_null_handler
from ds_dho2.optimizer import DHO2

__all__ = ["ADMMConfig", "ConfigError", "CurvatureConfig", "DHO2", "DHO2Config", "estimate_top_eigenpairs"]
__version__ = "0.1.0"

add_null_handler()  # a library configures no output; applications do (docs: README "Logging")


def _register_with_deepspeed() -> None:
    """Register ``"type": "DHO2"`` with DeepSpeed when it is installed (it is an optional dependency)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    from ds_dho2.integrations.deepspeed import register

    register()


def _install_trainer_hook() -> None:
    """Give every Hugging Face Trainer DHO2's curvature callback when transformers is installed."""
    from ds_dho2.integrations.trainer_hook import install

    install()


_register_with_deepspeed()
_install_trainer_hook()
