"""Communication and shard layout: everything that knows about ranks lives here."""

from ds_dho2.dist.comm import Communicator, LocalCommunicator, TorchDistCommunicator
from ds_dho2.dist.layout import ShardLayout

__all__ = ["Communicator", "LocalCommunicator", "TorchDistCommunicator", "ShardLayout"]
