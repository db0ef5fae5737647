"""qtuning-plugin: Q-Tuning (quadrant-based joint sample and token pruning) for SFT.

`QTuningConfig`, the engine (`QTuningEngine`), `select` and the fused ops need only torch and
pydantic.
`QTuningPlugin` (Axolotl) and `QTuningTrainerMixin` (transformers) are
imported on first use, so that ``import qtuning_plugin`` works without them.
"""

from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core import Selection, Triage, prune_tokens, sample_stats, select, token_scores, triage_samples
from qtuning_plugin.engine import QTuningEngine, SelectionEvent
from qtuning_plugin.ops import linear_cross_entropy, token_stats

__version__ = "0.1.0"

_LAZY = {
    "QTuningPlugin": "qtuning_plugin.axolotl.plugin",
    "QTuningTrainerMixin": "qtuning_plugin.hf.trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qtuning_plugin' has no attribute {name!r}")


__all__ = [
    "QTuningConfig",
    "QTuningEngine",
    "QTuningPlugin",
    "QTuningTrainerMixin",
    "Selection",
    "SelectionEvent",
    "Triage",
    "linear_cross_entropy",
    "prune_tokens",
    "sample_stats",
    "select",
    "token_scores",
    "token_stats",
    "triage_samples",
]
