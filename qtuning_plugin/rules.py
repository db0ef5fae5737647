"""Settings that Q-Tuning cannot honour, refused by name before training starts.

A rule is a function of one host's settings that returns why a setting cannot be honoured (a
message naming it, as the user wrote it) or None. Each host keeps its rules in one tuple:
`qtuning_plugin.hf.rules` (transformers, TRL, accelerate: checked on the trainer),
`qtuning_plugin.axolotl.rules` (Axolotl's config, checked when Axolotl validates it) and
`qtuning_plugin.llamafactory.rules`. `refuse` runs a tuple and raises one `ValueError` listing
every refusal. What several hosts refuse is stated once, below.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

Rule = Callable[[Any], Optional[str]]

#: The LM head's module name in the models the hosts know (`axolotl.loaders.utils.get_linear_embedding_layers`).
LM_HEAD_NAMES = ("lm_head", "embed_out")


def refusals(rules: Sequence[Rule], settings: Any) -> list[str]:
    """The messages of the rules that refuse ``settings``, in rule order."""
    return [message for rule in rules if (message := rule(settings))]


def refuse(rules: Sequence[Rule], settings: Any) -> None:
    """Raise `ValueError` naming every setting that one of ``rules`` refuses."""
    messages = refusals(rules, settings)
    if messages:
        raise ValueError("qtuning: settings Q-Tuning cannot honour:\n  - " + "\n  - ".join(messages))


# ------------------------------------------------------------ shared statements
def not_supervised(setting: str, value: Any) -> str:
    return f"{setting}: {value!r}: Q-Tuning is for supervised fine-tuning only; remove `qtuning:` or this setting"


def replaces_loss(setting: str, value: Any, instead: str = "") -> str:
    return (
        f"{setting}: {value!r}: replaces the cross-entropy loss, and Q-Tuning trains on the cross-entropy of "
        f"the kept tokens{'; ' + instead if instead else ''}"
    )


def splits_samples(setting: str, value: Any) -> str:
    return (
        f"{setting}: {value!r}: context/sequence parallelism splits each sample across ranks, and Q-Tuning "
        "needs whole samples to score them"
    )


def lora_on_lm_head(setting: str, value: Any) -> str:
    return (
        f"{setting}: {value!r}: LoRA on the LM head is not supported (the fused loss needs the head's own "
        "weight); train the head with `lora_modules_to_save: [lm_head]` or leave it out of the LoRA targets"
    )


def names_lm_head(targets: Any) -> bool:
    """Whether PEFT's ``target_modules`` / ``target_parameters`` (a list of names, or one regex) select the LM head.

    ``all-linear`` leaves the output layer out.
    """
    if not targets:
        return False
    if isinstance(targets, str):
        return targets != "all-linear" and any(re.fullmatch(targets, name) for name in LM_HEAD_NAMES)
    return any(part in LM_HEAD_NAMES for target in targets for part in str(target).split("."))
