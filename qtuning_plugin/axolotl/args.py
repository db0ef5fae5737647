"""The `qtuning:` section of an Axolotl config, and how it reaches the trainer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, model_validator

from qtuning_plugin.config import QTuningConfig

# The LM head's module name in the models Axolotl knows (`axolotl.loaders.utils.get_linear_embedding_layers`).
LM_HEAD_NAMES = ("lm_head", "embed_out")


def _names_lm_head(targets: Any) -> bool:
    """Whether PEFT's ``target_modules`` / ``target_parameters`` (a list of names, or one regex) select the LM head.

    ``all-linear`` (and Axolotl's ``lora_target_linear``) leave the output layer out.
    """
    if not targets:
        return False
    if isinstance(targets, str):
        return targets != "all-linear" and any(re.fullmatch(targets, name) for name in LM_HEAD_NAMES)
    return any(part in LM_HEAD_NAMES for target in targets for part in str(target).split("."))


class QTuningArgs(BaseModel):
    """Merged into Axolotl's config schema: adds the nested `qtuning:` section."""

    qtuning: Optional[QTuningConfig] = None

    @model_validator(mode="before")
    @classmethod
    def check_compatible(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "qtuning" not in data:
            return data
        if data["qtuning"] is None:  # an empty `qtuning:` section turns Q-Tuning on with the defaults
            data = {**data, "qtuning": {}}
        section = data["qtuning"]
        if not isinstance(section, dict) or not section.get("enabled", True):
            return data
        if data.get("rl"):
            raise ValueError(f"qtuning: supervised fine-tuning only; remove `qtuning:` or `rl: {data['rl']}`")
        micro_batch_scope = section.get("triage_scope") == "micro_batch"
        if data.get("sample_packing") and micro_batch_scope and section.get("scoring") == "two_pass":
            raise ValueError(
                "qtuning.scoring: two_pass with `triage_scope: micro_batch` needs one sample per row; with "
                "`sample_packing: true` use `single_pass` or `auto`, or `triage_scope: step`"
            )
        for key in ("lora_target_modules", "lora_target_parameters"):
            if _names_lm_head(data.get(key)):
                raise ValueError(
                    f"qtuning: LoRA on the LM head is not supported ({key}: {data[key]!r}); train the head "
                    "with `lora_modules_to_save: [lm_head]` or leave it out of the LoRA targets"
                )
        for key in ("context_parallel_size", "sequence_parallel_degree"):
            if (data.get(key) or 1) > 1:
                raise ValueError(
                    f"qtuning: {key}: {data[key]} splits each sample across ranks; Q-Tuning scores whole samples"
                )
        return data


@dataclass
class QTuningTrainingArgsMixin:
    """Merged into Axolotl's `TrainingArguments`: the validated section, as a dict."""

    qtuning: Optional[dict] = field(default=None, metadata={"help": "Q-Tuning settings (QTuningConfig)."})


def qtuning_section(cfg: Any) -> Optional[dict]:
    """The validated `qtuning:` section of an Axolotl cfg when it enables Q-Tuning, else None.

    A section present but empty enables Q-Tuning with the defaults.
    """
    if not hasattr(cfg, "get") or "qtuning" not in cfg:
        return None
    section = QTuningConfig.model_validate(dict(cfg.get("qtuning") or {})).model_dump()
    return section if section["enabled"] else None
