"""The Q-Tuning step with no trainer behind it: micro-batches in, passes and losses out.

Host adapters (`qtuning_plugin.hf` for transformers/TRL, `qtuning_plugin.axolotl`,
`qtuning_plugin.llamafactory`) feed it micro-batches and hand its passes and losses to
their training loop; `qtuning_plugin.analyze` scores datasets with it.
"""

from qtuning_plugin.engine.engine import MIN_TRIAGE_SAMPLES, QTuningEngine, SelectionEvent, kept_token_loss
from qtuning_plugin.engine.micro_batch import MicroBatch
from qtuning_plugin.engine.passes import NO_PASS, PASS_KEY, TrainingPass, no_pass, training_passes

__all__ = [
    "MIN_TRIAGE_SAMPLES",
    "NO_PASS",
    "PASS_KEY",
    "MicroBatch",
    "QTuningEngine",
    "SelectionEvent",
    "TrainingPass",
    "kept_token_loss",
    "no_pass",
    "training_passes",
]
