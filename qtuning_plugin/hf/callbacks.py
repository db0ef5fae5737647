"""Q-Tuning's pictures of a training run in ``output_dir`` (`QTuningPlotCallback`) and the start of
its decision log (`QTuningDecisionsCallback`); its state goes into every checkpoint through
`QTuningTrainerMixin._save_checkpoint`."""

from __future__ import annotations

from transformers import TrainerCallback

from qtuning_plugin._logging import LOG
from qtuning_plugin.decisions import DecisionLog
from qtuning_plugin.history import QTuningHistory


class QTuningPlotCallback(TrainerCallback):
    """On the main process: the EU-plane and quadrant-fraction PNGs (`qtuning_plugin.plots`)
    at the end of training, and every ``every_n_steps`` optimizer steps when > 0 (at the
    first logging step at or after each multiple, so that the latest metrics are in).

    A missing matplotlib costs one warning, never the training run.
    """

    def __init__(self, history: QTuningHistory, every_n_steps: int = 0):
        self.history = history
        self.every_n_steps = every_n_steps
        self._plotted_bucket = 0
        self._disabled = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every_n_steps > 0:
            self._plotted_bucket = state.global_step // self.every_n_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.every_n_steps <= 0 or not logs or "loss" not in logs:
            return
        bucket = state.global_step // self.every_n_steps
        if bucket > self._plotted_bucket:
            self._plotted_bucket = bucket
            self.write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.write(args, state)

    def write(self, args, state) -> None:
        if self._disabled or not state.is_world_process_zero:
            return
        try:
            from qtuning_plugin.plots import write_training_plots

            paths = write_training_plots(self.history, state.log_history, args.output_dir, step=state.global_step)
        except ImportError as error:
            self._disabled = True
            LOG.warning("qtuning: no plots (%s); install matplotlib: pip install 'qtuning-plugin[plots]'", error)
            return
        LOG.info("qtuning: plots written to %s", ", ".join(paths))


class QTuningDecisionsCallback(TrainerCallback):
    """``log_decisions``: when training starts (afresh, or resumed at the checkpoint's step, which
    the Trainer has read by then), the decision log keeps only the lines of the steps before it."""

    def __init__(self, decisions: DecisionLog):
        self.decisions = decisions

    def on_train_begin(self, args, state, control, **kwargs):
        self.decisions.restart(state.global_step)
