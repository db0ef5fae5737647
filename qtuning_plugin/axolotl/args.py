"""The `qtuning:` section of an Axolotl config, and how it reaches the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, model_validator

from qtuning_plugin.config import QTuningConfig


class QTuningArgs(BaseModel):
    """Merged into Axolotl's config schema: adds the nested `qtuning:` section."""

    qtuning: Optional[QTuningConfig] = None

    @model_validator(mode="before")
    @classmethod
    def check_compatible(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("qtuning"), dict):
            return data
        section = data["qtuning"]
        if not section.get("enabled", True):
            return data
        if data.get("rl"):
            raise ValueError(f"qtuning: supervised fine-tuning only; remove `qtuning:` or `rl: {data['rl']}`")
        micro_batch_scope = section.get("triage_scope") == "micro_batch"
        if data.get("sample_packing") and micro_batch_scope and section.get("scoring") == "two_pass":
            raise ValueError(
                "qtuning.scoring: two_pass with `triage_scope: micro_batch` needs one sample per row; with "
                "`sample_packing: true` use `single_pass` or `auto`, or `triage_scope: step`"
            )
        return data


@dataclass
class QTuningTrainingArgsMixin:
    """Merged into Axolotl's `TrainingArguments`: the validated section, as a dict."""

    qtuning: Optional[dict] = field(default=None, metadata={"help": "Q-Tuning settings (QTuningConfig)."})


def qtuning_section(cfg: Any) -> Optional[dict]:
    """The validated `qtuning:` section of an Axolotl cfg when it enables Q-Tuning, else None."""
    section = cfg.get("qtuning") if hasattr(cfg, "get") else None
    if not section:
        return None
    section = QTuningConfig.model_validate(dict(section)).model_dump()
    return section if section["enabled"] else None
