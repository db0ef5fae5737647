"""LM-head ops: chunked per-token statistics and cross-entropy."""

from qtuning_plugin.ops.contract import default_chunk_size
from qtuning_plugin.ops.torch_chunked import linear_cross_entropy, token_stats

__all__ = ["default_chunk_size", "linear_cross_entropy", "token_stats"]
