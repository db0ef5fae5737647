"""Stop a run whose `qtuning:` section Axolotl would ignore (a pydantic plugin, loaded through the
``pydantic`` entry-point group).

Axolotl 0.19 loads plugins only from the config's ``plugins:`` list, and drops keys its schema does
not know: without ``qtuning_plugin.QTuningPlugin`` in that list, a `qtuning:` section is ignored and
the run trains plain SFT. No Axolotl hook runs in that case (0.19 reads its ``axolotl.cli_commands``
entry points only for commands it does not have itself, never for ``axolotl train``), but Axolotl
validates every config with pydantic before it loads the tokenizer or the model. Pydantic loads
the plugins that installed packages register (https://docs.pydantic.dev/latest/concepts/plugins/);
this one watches Axolotl's config models only. When Axolotl validates a config with an enabled
`qtuning:` section against a model that has no `qtuning` field (the plugin's fields are merged in
only when Axolotl loaded the plugin), it stops the run with the lines to add. Axolotl >= 0.21 loads
the plugin through its ``axolotl.plugins`` entry point, so there the check never fires.

This module is imported wherever pydantic builds its first model: it imports nothing at load time.
"""

from __future__ import annotations

from typing import Any

PLUGIN_NAME = "qtuning_plugin.QTuningPlugin"
# The config models Axolotl validates a whole config with (axolotl.utils.schemas.config, and the
# classes axolotl.integrations.config.merge_input_args builds from them with the plugins' fields).
CONFIG_MODELS = ("AxolotlInputConfig", "AxolotlConfigWCapabilities")


def plugin_not_loaded(cfg: dict[str, Any]) -> str:
    """Why a config with a `qtuning:` section would train without Q-Tuning, and the lines that fix it."""
    listed = cfg.get("plugins") or []
    others = [str(name) for name in listed if "qtuning" not in str(name).lower()]
    lines = "\n".join(["plugins:", *(f"  - {name}" for name in [*others, PLUGIN_NAME])])
    where = "these lines to the config" if not listed else "the plugin to the config's `plugins:` list"
    return (
        "qtuning: the config has a `qtuning:` section, but Axolotl has not loaded the Q-Tuning plugin, so it "
        "would ignore the section and train without Q-Tuning (Axolotl 0.19 loads only the plugins the config "
        f"lists). Add {where}:\n\n{lines}\n\n"
        "or remove the `qtuning:` section (or set `enabled: false` in it) to train without Q-Tuning."
    )


def _enabled(section: Any) -> bool:
    return not (isinstance(section, dict) and section.get("enabled", True) is False)


class _ConfigValidation:
    """pydantic's validation event handler for one of Axolotl's config models."""

    def __init__(self, model: Any):
        self.model = model

    def on_enter(self, input: Any, **kwargs: Any) -> None:  # noqa: A002 (pydantic's name)
        if not isinstance(input, dict) or "qtuning" not in input or not _enabled(input["qtuning"]):
            return
        if "qtuning" not in getattr(self.model, "model_fields", {}):
            raise SystemExit(plugin_not_loaded(input))


class AxolotlConfigGuard:
    """The pydantic plugin (`pydantic.plugin.PydanticPluginProtocol`)."""

    def new_schema_validator(self, schema, schema_type, schema_type_path, schema_kind, config, plugin_settings):
        if (
            schema_kind == "BaseModel"
            and schema_type_path.module.startswith("axolotl.")
            and schema_type_path.name in CONFIG_MODELS
        ):
            return _ConfigValidation(schema_type), None, None
        return None, None, None


plugin = AxolotlConfigGuard()
