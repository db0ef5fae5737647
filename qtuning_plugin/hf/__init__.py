"""The transformers/TRL adapter: `QTuningTrainerMixin`, the trainer settings it refuses, and its
callbacks (plots, checkpointed state). Needs transformers."""
