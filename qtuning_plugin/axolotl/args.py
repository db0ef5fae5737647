"""The `qtuning:` section of an Axolotl config, and how it reaches the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, model_validator

from qtuning_plugin.axolotl.rules import RULES
from qtuning_plugin.config import SECTION, QTuningConfig, validate_section
from qtuning_plugin.rules import refuse


class QTuningArgs(BaseModel):
    """Merged into Axolotl's config schema: adds the nested `qtuning:` section."""

    qtuning: Optional[QTuningConfig] = None

    @model_validator(mode="before")
    @classmethod
    def check_compatible(cls, data: Any) -> Any:
        if not isinstance(data, dict) or SECTION not in data:
            return data
        if data[SECTION] is None:  # an empty `qtuning:` section turns Q-Tuning on with the defaults
            data = {**data, SECTION: {}}
        # the section's own errors, as the LLaMA-Factory launcher words them (an unknown key lists
        # the valid keys), rather than pydantic's "Extra inputs are not permitted"
        if validate_section(data[SECTION]).enabled:
            refuse(RULES, data)
        return data


@dataclass
class QTuningTrainingArgsMixin:
    """Merged into Axolotl's `TrainingArguments`: the validated section, as a dict."""

    qtuning: Optional[dict] = field(default=None, metadata={"help": "Q-Tuning settings (QTuningConfig)."})


def qtuning_section(cfg: Any) -> Optional[dict]:
    """The validated `qtuning:` section of an Axolotl cfg when it enables Q-Tuning, else None.

    A section present but empty enables Q-Tuning with the defaults.
    """
    if not hasattr(cfg, "get") or SECTION not in cfg:
        return None
    section = QTuningConfig.model_validate(dict(cfg.get(SECTION) or {})).model_dump()
    return section if section["enabled"] else None
