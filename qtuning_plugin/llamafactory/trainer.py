"""LLaMA-Factory's SFT trainer with the Q-Tuning loss, and its LlamaBoard log with our metrics.

Both are built on the classes LLaMA-Factory is about to use (passed in by the launcher), so that
whatever else replaced them stays in the hierarchy.
"""

from __future__ import annotations

import os
from typing import Any

from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
from qtuning_plugin.atomic_files import append_jsonl

METRIC_PREFIX = "qtuning/"


def qtuning_trainer_class(base: type, config: QTuningConfig) -> type:
    """``base`` (LLaMA-Factory's ``CustomSeq2SeqTrainer``) with `QTuningTrainerMixin` first, set up with ``config``.

    The mixin replaces the training loss; LLaMA-Factory's optimizer, scheduler, sampler,
    evaluation and prediction code stay as they are.
    """

    class LlamaFactoryQTuningTrainer(QTuningTrainerMixin, base):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, qtuning_config=config, **kwargs)

    return LlamaFactoryQTuningTrainer


def qtuning_log_callback_class(base: type) -> type:
    """``base`` (LLaMA-Factory's ``LogCallback``) whose ``trainer_log.jsonl`` lines also carry the
    ``qtuning/`` metrics of their training step.

    ``LogCallback.on_log`` writes a fixed set of keys (step, loss, learning rate, timing), one line
    per log, from a worker thread: the metrics of each logged step are kept here by step and added
    to the line when it is written. The line goes to LLaMA-Factory's file with
    `qtuning_plugin.atomic_files.append_jsonl`, so that a kill cuts the file only at a line.
    """
    from llamafactory.extras.constants import TRAINER_LOG

    class QTuningLogCallback(base):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._qtuning_metrics_by_step: dict[int, dict[str, float]] = {}

        def on_log(self, args, state, control, **kwargs):
            latest = state.log_history[-1] if state.log_history else {}
            metrics = {key: value for key, value in latest.items() if key.startswith(METRIC_PREFIX)}
            if metrics:
                self._qtuning_metrics_by_step[state.global_step] = metrics
            return super().on_log(args, state, control, **kwargs)

        def _write_log(self, output_dir: str, logs: dict[str, Any]) -> None:
            metrics = self._qtuning_metrics_by_step.pop(logs.get("current_steps"), {})
            append_jsonl(os.path.join(output_dir, TRAINER_LOG), {**logs, **metrics})

    return QTuningLogCallback
