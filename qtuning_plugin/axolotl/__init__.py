"""The Axolotl adapter: the `qtuning:` config section, the trainer and the `axolotl qtuning` command."""
