"""The Axolotl config keys Q-Tuning cannot honour, each one rule over the raw config (a dict),
checked when Axolotl validates the config: before the dataset and the model load.

The trainer-level rules of `qtuning_plugin.hf.rules` apply on top, when the trainer is built.
"""

from __future__ import annotations

from typing import Any, Optional

from qtuning_plugin.rules import lora_on_lm_head, names_lm_head, not_supervised, replaces_loss, splits_samples


def rl(cfg: dict[str, Any]) -> Optional[str]:
    return not_supervised("rl", cfg["rl"]) if cfg.get("rl") else None


def orpo_alpha(cfg: dict[str, Any]) -> Optional[str]:
    return not_supervised("orpo_alpha", cfg["orpo_alpha"]) if cfg.get("orpo_alpha") else None


def use_eaft(cfg: dict[str, Any]) -> Optional[str]:
    return replaces_loss("use_eaft", cfg["use_eaft"], "remove use_eaft") if cfg.get("use_eaft") else None


def lora_targets(cfg: dict[str, Any]) -> Optional[str]:
    for key in ("lora_target_modules", "lora_target_parameters"):
        if names_lm_head(cfg.get(key)):
            return lora_on_lm_head(key, cfg[key])
    return None


def context_parallel(cfg: dict[str, Any]) -> Optional[str]:
    for key in ("context_parallel_size", "sequence_parallel_degree"):
        if (cfg.get(key) or 1) > 1:
            return splits_samples(key, cfg[key])
    return None


RULES = (rl, orpo_alpha, use_eaft, lora_targets, context_parallel)
