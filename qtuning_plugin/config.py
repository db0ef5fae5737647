"""`QTuningConfig`: every `qtuning:` key, its default and its allowed range.

The same model validates the Axolotl YAML section and configures the plain
`transformers.Trainer` mixin. Unknown keys are rejected (``extra="forbid"``):
a misspelt key must fail loudly rather than silently fall back to a default.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qtuning_plugin.rules import QTuningSettingsError

#: The section's name in a host's config.
SECTION = "qtuning"


class QTuningConfig(BaseModel):
    """Settings of Q-Tuning (docs/algorithm.md sections 4-7)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(
        default=True,
        description="Turn Q-Tuning on. A `qtuning:` section enables it unless it says `enabled: false`.",
    )
    sample_keep_ratio: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="Fraction of each mini-batch's samples kept by EU-plane triage, in (0, 1].",
    )
    token_keep_ratio: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Fraction of trainable tokens kept in each Q2 sample, in (0, 1].",
    )
    context_weight: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Lambda of eq. 7: weight of the two neighbours' perplexities in the token score, in [0, 1].",
    )
    prune_highest_scores: bool = Field(
        default=True,
        description="Prune the highest-scoring Q2 tokens (the paper). False prunes the lowest: an ablation only.",
    )
    max_bisect_iters: int = Field(
        default=10, ge=1, description="Iterations of the quantile bisection, >= 1."
    )
    bisect_tolerance: float = Field(
        default=0.01,
        gt=0.0,
        description="Bisection stops once |kept fraction - sample_keep_ratio| is below this, > 0.",
    )
    triage_window: int = Field(
        default=1,
        ge=1,
        description=(
            "Optimizer steps whose samples the triage thresholds rest on, >= 1: the quantiles and the bisection "
            "run on the (PPL, Ent) of this step's samples and those of the triage_window - 1 steps before it "
            "(every rank's), and the step keeps exactly round(sample_keep_ratio x its samples) of its own. "
            "1: the paper's rule, on the step alone. An extension beyond the paper (docs/algorithm.md section 4a); "
            "triage_scope step only."
        ),
    )
    hold_budget: Optional[bool] = Field(
        default=None,
        description=(
            "true: each triage keeps exactly max(1, round(sample_keep_ratio x its samples)); where more qualify, "
            "those with the lowest fill-up score are dropped. false: the paper's rule, every sample the "
            "thresholds put in Q2 or Q4 is kept (at least that many). null: held where triage_window > 1, "
            "else the paper's rule."
        ),
    )
    triage_scope: Literal["step", "micro_batch"] = Field(
        default="step",
        description=(
            "step: triage the optimizer step's whole mini-batch (micro_batch_size x gradient_accumulation_steps "
            "x world_size samples) once, then train on the kept samples regrouped into micro-batches. "
            "micro_batch: triage each micro-batch (over every rank's) on its own, as the loss is computed."
        ),
    )
    scoring: Literal["auto", "two_pass", "single_pass"] = Field(
        default="auto",
        description=(
            "two_pass: gradient-free scoring forward, then forward/backward on the kept samples only. "
            "single_pass: one forward with gradient, pruning by loss masking (triage_scope micro_batch only). "
            "auto: two_pass."
        ),
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Train on every sample and token for this many optimizer steps before pruning, >= 0.",
    )
    backend: Literal["auto", "liger", "torch"] = Field(
        default="auto",
        description="Fused linear cross-entropy: liger (CUDA), torch (chunked, any device), auto picks.",
    )
    chunk_size: Optional[int] = Field(
        default=None,
        ge=1,
        description="Tokens per chunk of the torch fused op; null picks one from the vocabulary size.",
    )
    scoring_batch_tokens: Optional[int] = Field(
        default=None,
        ge=1,
        description=(
            "triage_scope step: positions (rows x padded length) per gradient-free scoring forward, >= 1; the "
            "step's micro-batches share forwards up to this many (a micro-batch larger than it is scored alone). "
            "null picks one: a forward without gradient holds one layer's activations at a time where the "
            "backward of a training micro-batch holds every layer's (with gradient checkpointing, every layer's "
            "input), so it takes the positions whose no-grad forward needs no more activation memory than the "
            "backward of the step's largest micro-batch, estimated from the model's layer count and sizes; on "
            "CUDA at least as many as fit in half of the free GPU memory (torch.cuda.mem_get_info)."
        ),
    )
    plot_every_n_steps: int = Field(
        default=0,
        ge=0,
        description="Write the EU-plane and quadrant plots every N optimizer steps (0: only at the end).",
    )
    log_decisions: bool = Field(
        default=False,
        description=(
            "Write output_dir/qtuning_decisions.jsonl on the main process: one line per triaged sample (every "
            "rank's) with the optimizer step, the sample's key (a hash of its token ids), quadrant, PPL, Ent, "
            "trainable and kept tokens."
        ),
    )

    @model_validator(mode="after")
    def _single_pass_needs_micro_batch_scope(self) -> "QTuningConfig":
        if self.scoring == "single_pass" and self.triage_scope == "step":
            raise ValueError(
                "qtuning.scoring: single_pass triages while the loss is computed, so it needs "
                "`triage_scope: micro_batch`; with `triage_scope: step` use `auto` or `two_pass`"
            )
        return self

    @model_validator(mode="after")
    def _scoring_batch_tokens_needs_step_scope(self) -> "QTuningConfig":
        if self.scoring_batch_tokens is not None and self.triage_scope != "step":
            raise ValueError(
                "qtuning.scoring_batch_tokens: sets how many positions a step's scoring forward takes, "
                "so it needs `triage_scope: step`; under `micro_batch` each micro-batch is scored on "
                "its own. Remove the key or use `triage_scope: step`"
            )
        return self

    @model_validator(mode="after")
    def _window_needs_step_scope_and_a_held_budget(self) -> "QTuningConfig":
        if self.triage_window > 1 and self.triage_scope != "step":
            raise ValueError(
                f"qtuning.triage_window: {self.triage_window} pools the samples of whole optimizer steps, so it "
                "needs `triage_scope: step`; use `triage_window: 1` under `micro_batch`"
            )
        if self.triage_window > 1 and self.hold_budget is False:
            raise ValueError(
                f"qtuning.hold_budget: false keeps every sample that the thresholds qualify, and with "
                f"`triage_window: {self.triage_window}` the window's thresholds may qualify any number of a "
                "step's samples, so a window holds the budget: remove `hold_budget` or set it true"
            )
        return self

    @property
    def holds_budget(self) -> bool:
        """Whether a triage keeps exactly its budget (``hold_budget``; null: where ``triage_window`` > 1)."""
        return self.hold_budget if self.hold_budget is not None else self.triage_window > 1

    def triage_batch_size(self, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
        """The samples one triage sees (the mini-batch): ``micro_batch_size x world_size``, times
        ``gradient_accumulation_steps`` under ``triage_scope: step``."""
        steps = gradient_accumulation_steps if self.triage_scope == "step" else 1
        return micro_batch_size * steps * world_size

    def describe(self) -> str:
        """One line listing every setting, for the start-up log."""
        return ", ".join(f"{name}={value}" for name, value in self.model_dump().items())


def validate_section(section: Any) -> QTuningConfig:
    """A config's ``qtuning:`` section, validated; None (the section present but empty) enables the defaults.

    Raises:
        QTuningSettingsError: one line per problem, each naming ``qtuning.<key>``; an unknown key's
            line lists the valid keys.
    """
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise QTuningSettingsError(f"{SECTION}: expected a mapping of settings (key: value), got {section!r}")
    try:
        return QTuningConfig.model_validate(section)
    except ValidationError as error:
        raise QTuningSettingsError("\n".join(_describe(problem) for problem in error.errors())) from None


def _describe(problem: dict[str, Any]) -> str:
    """One pydantic error as ``qtuning.<key>: <what is wrong>``."""
    key = ".".join([SECTION, *(str(part) for part in problem["loc"])])
    if problem["type"] == "extra_forbidden":
        return f"{key}: unknown key; the keys are {', '.join(QTuningConfig.model_fields)}"
    if problem["type"] == "value_error":  # a model validator's own message names its keys
        return str(problem["ctx"]["error"])
    return f"{key}: {problem['msg']}"
