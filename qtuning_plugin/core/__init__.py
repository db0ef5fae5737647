"""Framework-free Q-Tuning math: EU plane, sample triage, token pruning, selection.

A mini-batch here is the set of samples triaged together (`QTuningConfig.triage_batch_size`):
the optimizer step's micro-batches over all ranks under ``triage_scope: step`` (the paper's
mini-batch), one micro-batch over all ranks under ``micro_batch``.
"""

from qtuning_plugin.core.eu_plane import sample_stats
from qtuning_plugin.core.packing import Segments, is_packed
from qtuning_plugin.core.select import SampleGather, Selection, select, selection_stats
from qtuning_plugin.core.token_pruning import prune_tokens, token_scores
from qtuning_plugin.core.triage import Triage, triage_samples

__all__ = [
    "SampleGather",
    "Segments",
    "Selection",
    "Triage",
    "is_packed",
    "prune_tokens",
    "sample_stats",
    "select",
    "selection_stats",
    "token_scores",
    "triage_samples",
]
