"""qtuning-plugin: Q-Tuning (quadrant-based joint sample and token pruning) for SFT.

`QTuningConfig`, the engine (`QTuningEngine`), `select` and the fused ops need only torch and
pydantic; the whole-dataset selection (`select_dataset`, `write_selection`) needs ``datasets`` too. `QTuningPlugin` (Axolotl) and `QTuningTrainerMixin` (transformers) need their host.
Every name is imported on first use, so that ``import qtuning_plugin`` imports nothing heavy: the
package's pydantic plugin (`qtuning_plugin.axolotl.guard`) is loaded by every process that uses
pydantic where the package is installed.
"""

__version__ = "0.1.0"

_LAZY = {
    "QTuningConfig": "qtuning_plugin.config",
    "QTuningEngine": "qtuning_plugin.engine",
    "QTuningPlugin": "qtuning_plugin.axolotl.plugin",
    "QTuningTrainerMixin": "qtuning_plugin.hf.trainer",
    "Selection": "qtuning_plugin.core",
    "SelectionEvent": "qtuning_plugin.engine",
    "Triage": "qtuning_plugin.core",
    "linear_cross_entropy": "qtuning_plugin.ops",
    "prune_tokens": "qtuning_plugin.core",
    "sample_stats": "qtuning_plugin.core",
    "select": "qtuning_plugin.core",
    "select_dataset": "qtuning_plugin.dataset_selection",
    "token_scores": "qtuning_plugin.core",
    "token_stats": "qtuning_plugin.ops",
    "triage_samples": "qtuning_plugin.core",
    "write_selection": "qtuning_plugin.dataset_selection",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qtuning_plugin' has no attribute {name!r}")


__all__ = sorted(_LAZY)
