"""Q-Tuning for LLaMA-Factory: ``qtuning-llamafactory train cfg.yaml [key=value ...]``.

The user's own LLaMA-Factory YAML gains a top-level ``qtuning:`` section, validated by
`QTuningConfig`; every other key goes to LLaMA-Factory's parser as ``llamafactory-cli train``
would pass it. ``stage: sft`` then trains through LLaMA-Factory's own data, template, model and
trainer code, with `QTuningTrainerMixin` mixed into its SFT trainer.

    cli.py       the command: ``train`` here, every other command passed to ``llamafactory-cli``
    launcher.py  one process, or torchrun over the ranks with our worker; the hooks into LLaMA-Factory
    rules.py     settings refused at start-up, by name
    trainer.py   the trainer class and the LlamaBoard log callback with the ``qtuning/`` metrics

Importing this package imports nothing of LLaMA-Factory.
"""
