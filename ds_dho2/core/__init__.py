"""Rank-agnostic math on flat 1-D tensors that may be shards; collectives go through a Communicator."""
