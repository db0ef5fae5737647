"""The Axolotl adapter without a training run: entry points, the `axolotl qtuning` command,
config validation through Axolotl's own validator, and the tiny-model builder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

axolotl = pytest.importorskip("axolotl")
from packaging.version import Version  # noqa: E402

pytestmark = pytest.mark.axolotl

REPO = Path(__file__).resolve().parents[1]
# Of the tested releases (0.19, 0.21), 0.21 is the first that loads every `axolotl.plugins`
# entry point on each run, and raises on a `plugins:` entry it cannot import.
LOADS_ENTRY_POINTS = Version(axolotl.__version__) >= Version("0.21")
CONFIG_NAME = "qtuning_plugin.QTuningPlugin"  # what the README tells users to write
MODULE_NAME = "qtuning_plugin.axolotl.plugin.QTuningPlugin"  # where the class lives
EXAMPLES = REPO / "examples"
PLUGIN_LINES = "Add these lines to the config:\n\nplugins:\n  - qtuning_plugin.QTuningPlugin\n"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------ entry points
def _entry_point(group: str, name: str):
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    assert len(found) == 1, f"{group}: {[ep.name for ep in entry_points(group=group)]}"
    return found[0]


def test_plugin_entry_point_loads_the_plugin():
    from axolotl.integrations.base import BasePlugin

    from qtuning_plugin.axolotl.plugin import QTuningPlugin

    ep = _entry_point("axolotl.plugins", "qtuning")
    # Axolotl >= 0.21 keys the entry point's plugin by "module.Class" of this value: it must be
    # the name users write in `plugins:`, or that line loads a second instance
    assert ep.value.replace(":", ".") == CONFIG_NAME
    assert ep.load() is QTuningPlugin
    assert issubclass(QTuningPlugin, BasePlugin)


def test_installing_the_package_changes_no_pin_of_this_environment():
    """`pip install qtuning-plugin[axolotl,liger,plots]` where Axolotl (0.19 or 0.21) is installed adds
    this package and nothing else: no Axolotl, transformers, peft or trl up- or downgrade."""
    import qtuning_plugin

    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-index"]
    command += ["--quiet", "--report", "-", f"{REPO}[axolotl,liger,plots]"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = [(item["metadata"]["name"], item["metadata"]["version"]) for item in json.loads(proc.stdout)["install"]]
    assert installs == [("qtuning-plugin", qtuning_plugin.__version__)]


@pytest.fixture
def empty_plugin_manager():
    """Axolotl's PluginManager singleton with no plugin registered; restored afterwards."""
    from axolotl.integrations.base import PluginManager

    manager = PluginManager()
    saved_plugins, saved_cfg = manager.plugins.copy(), manager._cfg
    manager.plugins.clear()
    yield manager
    manager.plugins.clear()
    manager.plugins.update(saved_plugins)
    manager._cfg = saved_cfg


@pytest.mark.parametrize(
    "plugins",
    [None, [CONFIG_NAME], [MODULE_NAME], [CONFIG_NAME, MODULE_NAME]],
    ids=["no-plugins-line", "config-name", "module-name", "both-names"],
)
def test_each_way_of_naming_the_plugin_contributes_once(empty_plugin_manager, plugins):
    """Axolotl's own plugin preparation and config validation, as `axolotl train` runs them."""
    from axolotl.utils.config import prepare_plugins, validate_config

    from qtuning_plugin.axolotl.plugin import QTuningPlugin
    from qtuning_plugin.axolotl.trainer import AxolotlQTuningTrainer

    cfg = _tiny_cfg(sample_keep_ratio=0.5)
    if plugins is None:
        del cfg["plugins"]
    else:
        cfg["plugins"] = plugins
    prepare_plugins(cfg)
    manager = empty_plugin_manager.get_instance()
    instances = [plugin for plugin in manager.plugins.values() if isinstance(plugin, QTuningPlugin)]
    if plugins is None and not LOADS_ENTRY_POINTS:
        # 0.19 loads plugins from `plugins:` only, and would drop the `qtuning:` key: the package's
        # pydantic plugin stops the validation instead (qtuning_plugin/axolotl/guard.py)
        assert instances == []
        with pytest.raises(SystemExit) as stop:
            validate_config(cfg)
        assert PLUGIN_LINES in str(stop.value), stop.value
        return
    # one instance per name Axolotl registered; the entry point's name is the config name
    names = set(plugins or []) | ({CONFIG_NAME} if LOADS_ENTRY_POINTS else set())
    assert len(instances) == len(names)
    assert [plugin.is_duplicate() for plugin in instances] == [False] + [True] * (len(instances) - 1)
    assert manager.get_input_args().count("qtuning_plugin.axolotl.args.QTuningArgs") == 1
    assert manager.get_training_args_mixin().count("qtuning_plugin.axolotl.args.QTuningTrainingArgsMixin") == 1
    validated = validate_config(cfg)  # merging QTuningArgs twice would fail: "duplicate base class"
    assert validated.qtuning["sample_keep_ratio"] == 0.5
    assert manager.get_trainer_cls(validated) is AxolotlQTuningTrainer
    assert [plugin.get_training_args(validated) != {} for plugin in instances] == [True] + [False] * (len(instances) - 1)


@pytest.mark.skipif(LOADS_ENTRY_POINTS, reason="0.21 loads the plugin without a `plugins:` line")
@pytest.mark.parametrize(
    "plugins, lines",
    [
        ([], PLUGIN_LINES),
        # the other plugins stay (their fields merged in: a model of its own without `qtuning`); a
        # misspelt name of ours, which 0.19 logs and skips, is replaced
        (["axolotl.integrations.lm_eval.LMEvalPlugin", "qtuning_plugins.QTuningPlugin"],
         "Add the plugin to the config's `plugins:` list:\n\nplugins:\n  - axolotl.integrations.lm_eval.LMEvalPlugin\n"
         "  - qtuning_plugin.QTuningPlugin\n"),
    ],
    ids=["empty-list", "other-plugins"],
)
def test_a_qtuning_section_axolotl_would_ignore_stops_validation_with_the_lines_to_add(
    empty_plugin_manager, plugins, lines
):
    from axolotl.utils.config import prepare_plugins, validate_config

    cfg = _tiny_cfg(sample_keep_ratio=0.5)
    cfg["plugins"] = plugins
    prepare_plugins(cfg)
    with pytest.raises(SystemExit) as stop:
        validate_config(cfg)
    assert "has not loaded the Q-Tuning plugin" in str(stop.value) and lines in str(stop.value), stop.value


@pytest.mark.skipif(LOADS_ENTRY_POINTS, reason="0.21 loads the plugin without a `plugins:` line")
def test_a_disabled_qtuning_section_without_the_plugin_validates(empty_plugin_manager):
    from axolotl.utils.config import validate_config

    cfg = _tiny_cfg(enabled=False)
    del cfg["plugins"]
    assert "qtuning" not in validate_config(cfg)


def test_plugins_entry_that_cannot_be_imported(empty_plugin_manager):
    """0.21 stops on it (the README says so); 0.19 logs the error and goes on without it."""
    from axolotl.utils.config import prepare_plugins

    cfg = _tiny_cfg()
    cfg["plugins"] = ["qtuning_plugin_not_installed.QTuningPlugin"]
    if LOADS_ENTRY_POINTS:
        with pytest.raises(ModuleNotFoundError, match="qtuning_plugin_not_installed"):
            prepare_plugins(cfg)
    else:
        prepare_plugins(cfg)
        assert "qtuning_plugin_not_installed.QTuningPlugin" not in empty_plugin_manager.plugins


def test_dotted_plugin_name_used_in_configs_loads():
    """`plugins: [qtuning_plugin.QTuningPlugin]` goes through Axolotl's own loader."""
    from axolotl.integrations.base import load_plugin

    from qtuning_plugin.axolotl.plugin import QTuningPlugin

    assert isinstance(load_plugin("qtuning_plugin.QTuningPlugin"), QTuningPlugin)


def test_the_logger_is_the_packages_own_until_the_axolotl_plugin_loads():
    """Axolotl shows INFO records of `axolotl.*` loggers only; elsewhere the name is the package's."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(name)s %(message)s')\n"
        "from qtuning_plugin._logging import LOG\n"
        "LOG.info('before')\n"
        "from qtuning_plugin.axolotl.plugin import QTuningPlugin\n"
        "QTuningPlugin()\n"
        "LOG.info('after')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.endswith(("before", "after"))]
    assert lines == ["qtuning_plugin before", "axolotl.integrations.qtuning after"]


def test_cli_entry_point_loads_the_command_group():
    import click

    ep = _entry_point("axolotl.cli_commands", "qtuning")
    group = ep.load()
    assert isinstance(group, click.Group)
    assert set(group.commands) == set(COMMANDS)


COMMANDS = ("build-tiny", "fetch-smollm2", "examples", "analyze", "select")


def test_axolotl_qtuning_help_lists_its_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "qtuning", "--help"],
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for command in COMMANDS:
        assert command in proc.stdout, proc.stdout


# -------------------------------------------------------------- config validation
@pytest.fixture
def plugin_manager():
    """Axolotl's PluginManager singleton with our plugin registered; restored afterwards."""
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    saved_plugins, saved_cfg = manager.plugins.copy(), manager._cfg
    manager.register("qtuning_plugin.QTuningPlugin")
    yield manager
    manager.plugins.clear()
    manager.plugins.update(saved_plugins)
    manager._cfg = saved_cfg


def _tiny_cfg(**qtuning):
    from axolotl.utils.dict import DictDefault

    cfg = yaml.safe_load((EXAMPLES / "tiny-cpu-qtuning.yml").read_text(encoding="utf-8"))
    cfg["qtuning"] = qtuning
    return DictDefault(cfg)


def test_axolotl_validation_accepts_the_tiny_example(plugin_manager):
    from axolotl.utils.config import validate_config

    cfg = validate_config(_tiny_cfg(sample_keep_ratio=0.5, token_keep_ratio=0.5))
    assert cfg.qtuning["sample_keep_ratio"] == 0.5
    assert cfg.qtuning["token_keep_ratio"] == 0.5
    assert cfg.qtuning["context_weight"] == 0.5  # defaults filled in


@pytest.mark.parametrize(
    "section, key, message",
    [
        ({"sample_keep_ratio": 1.5}, "sample_keep_ratio", "less than or equal to 1"),
        ({"sample_keep_ratio": 0.0}, "sample_keep_ratio", "greater than 0"),
        ({"token_keep_ratio": -0.1}, "token_keep_ratio", "greater than 0"),
        ({"context_weight": 2.0}, "context_weight", "less than or equal to 1"),
        ({"scoring": "three_pass"}, "scoring", "two_pass"),
        ({"samples_keep_ratio": 0.5}, "samples_keep_ratio", "unknown key; the keys are enabled, sample_keep_ratio,"),
    ],
)
def test_axolotl_validation_rejects_bad_values_naming_the_key(plugin_manager, section, key, message):
    from axolotl.utils.config import validate_config

    with pytest.raises(Exception) as info:
        validate_config(_tiny_cfg(**section))
    text = str(info.value)
    assert f"qtuning.{key}" in text and message in text, text


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("use_eaft", True, "use_eaft: True: replaces the cross-entropy loss"),
        ("rl", "dpo", "rl: 'dpo': Q-Tuning is for supervised fine-tuning only"),
        ("orpo_alpha", 0.1, "orpo_alpha: 0.1: Q-Tuning is for supervised fine-tuning only"),
        ("context_parallel_size", 2, "context_parallel_size: 2: context/sequence parallelism splits each sample"),
        ("sequence_parallel_degree", 2, "sequence_parallel_degree: 2: context/sequence parallelism"),
    ],
)
def test_settings_qtuning_cannot_honour_are_refused_at_validation_by_name(plugin_manager, key, value, message):
    """Before the dataset and the model load (Axolotl validates the config first); the same
    settings are accepted with `enabled: false`."""
    from axolotl.utils.config import validate_config

    if key == "sequence_parallel_degree" and Version(axolotl.__version__) >= Version("0.21"):
        # Axolotl 0.21 renames the deprecated key to context_parallel_size before plugins validate.
        message = message.replace(key, "context_parallel_size")
    cfg = _tiny_cfg()
    cfg[key] = value
    with pytest.raises(Exception, match=message):
        validate_config(cfg)
    from qtuning_plugin.axolotl.args import QTuningArgs

    off = _tiny_cfg(enabled=False)
    assert QTuningArgs.check_compatible({**off, key: value})[key] == value


def test_packed_rows_with_two_pass_scoring_validate_in_both_scopes(plugin_manager):
    from axolotl.utils.config import validate_config

    for scope in ("step", "micro_batch"):
        cfg = _tiny_cfg(scoring="two_pass", triage_scope=scope)
        cfg["sample_packing"] = True
        assert validate_config(cfg).qtuning["triage_scope"] == scope


def test_an_empty_qtuning_section_turns_qtuning_on_with_the_defaults(plugin_manager):
    """`qtuning:` with nothing under it (YAML null), as the README says: a section turns it on."""
    from axolotl.utils.config import validate_config

    from qtuning_plugin import QTuningConfig
    from qtuning_plugin.axolotl.plugin import QTuningPlugin
    from qtuning_plugin.axolotl.trainer import AxolotlQTuningTrainer

    raw = yaml.safe_load("qtuning:\n")
    assert raw == {"qtuning": None}
    cfg = _tiny_cfg()
    cfg["qtuning"] = raw["qtuning"]
    cfg = validate_config(cfg)
    assert QTuningConfig.model_validate(cfg.qtuning) == QTuningConfig()
    assert QTuningPlugin().get_trainer_cls(cfg) is AxolotlQTuningTrainer
    without = _tiny_cfg()
    del without["qtuning"]
    assert QTuningPlugin().get_trainer_cls(validate_config(without)) is None


@pytest.mark.parametrize(
    "key, value",
    [
        ("lora_target_modules", ["q_proj", "lm_head"]),
        ("lora_target_modules", "lm_head"),
        ("lora_target_modules", ".*(lm_head|q_proj)"),
        ("lora_target_parameters", ["lm_head.weight"]),
    ],
)
def test_lora_on_the_lm_head_is_refused_at_validation(plugin_manager, key, value):
    from axolotl.utils.config import validate_config

    cfg = _tiny_cfg()
    cfg[key] = value
    with pytest.raises(Exception, match=rf"{key}: .*: LoRA on the LM head is not supported"):
        validate_config(cfg)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ".*proj"])
def test_lora_elsewhere_with_the_lm_head_trained_whole_is_accepted(plugin_manager, targets):
    from axolotl.utils.config import validate_config

    cfg = _tiny_cfg()
    cfg.update(lora_target_modules=targets, lora_target_linear=True, lora_modules_to_save=["lm_head"])
    assert validate_config(cfg).lora_modules_to_save == ["lm_head"]


@pytest.mark.parametrize("scoring", ["step", "two_pass"])
def test_axolotls_own_compute_loss_work_is_kept(tmp_path, scoring):
    """`AxolotlTrainer.compute_loss` counts the tokens behind `tokens/train_per_sec_per_gpu` and
    fixes up model inputs (for Gemma 4 it adds zero `mm_token_type_ids`): under Q-Tuning both
    still happen, in every forward of the step, in both triage scopes. The tiny Llama's config
    says gemma4 to take that branch; one training step through `Trainer.train()`."""
    from axolotl.core.training_args import AxolotlTrainingArguments
    from datasets import Dataset

    from qtuning_plugin import QTuningConfig
    from qtuning_plugin.axolotl.trainer import AxolotlQTuningTrainer

    from conftest import SCORINGS, random_batch, tiny_llama

    model = tiny_llama()
    model.get_base_model().config.model_type = "gemma4"
    args = AxolotlTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=1,
        per_device_train_batch_size=8, logging_steps=1,
    )
    assert args.include_tkps
    batch = random_batch(batch=8)
    trainer = AxolotlQTuningTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({key: value.tolist() for key, value in batch.items()}),
        qtuning_config=QTuningConfig(sample_keep_ratio=0.5, **SCORINGS[scoring]),
    )
    type_ids = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda _m, _a, kwargs: type_ids.append(kwargs.get("mm_token_type_ids")), with_kwargs=True
    )
    trainer.train()
    hook.remove()
    assert len(type_ids) == 2  # the scoring and the training forward
    assert all(ids is not None and not ids.any() for ids in type_ids)
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["tokens/trainable"] == int((batch["labels"] != -100).sum())
    assert logged["tokens/total"] == batch["labels"].numel()


def test_llama3_example_passes_axolotl_validation_offline(plugin_manager):
    """Schema validation with the capabilities of a bf16 GPU; needs no hub access (loading the
    model config, which `axolotl train` does next in normalize_config, would)."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(yaml.safe_load((EXAMPLES / "llama3-qtuning.yml").read_text(encoding="utf-8")))
    capabilities = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_89"}
    cfg = validate_config(cfg, capabilities=capabilities, env_capabilities={"torch_version": "2.13.0"})
    assert cfg.adapter == "qlora" and cfg.load_in_4bit
    assert cfg.qtuning["sample_keep_ratio"] == 0.25 and cfg.qtuning["token_keep_ratio"] == 0.5
    assert cfg.learning_rate == 1e-4 and cfg.lora_r == 8 and cfg.num_epochs == 3
    assert cfg.sample_packing and cfg.pad_to_sequence_len and cfg.attn_implementation == "sdpa"


def test_smollm2_example_passes_axolotl_validation_wherever_written(plugin_manager, tmp_path):
    """The copy `axolotl qtuning examples DIR` writes, validated as `axolotl train` validates it on CPU."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    from qtuning_plugin.example_files import write_examples

    (path,) = [path for path in write_examples(tmp_path) if path.name == "smollm2-135m-qtuning.yml"]
    cfg = validate_config(DictDefault(yaml.safe_load(path.read_text(encoding="utf-8"))))
    assert cfg.base_model == str(tmp_path / "smollm2-135m-instruct")
    assert cfg.qtuning["sample_keep_ratio"] == 0.25 and cfg.qtuning["triage_scope"] == "step"
    # at least 8 samples per triage (the start-up warning's floor), from gradient accumulation
    assert cfg.micro_batch_size * cfg.gradient_accumulation_steps == 8 and cfg.gradient_accumulation_steps > 1
    assert cfg.adapter == "lora" and not cfg.bf16 and not cfg.fp16 and not cfg.sample_packing
    assert cfg.shuffle_merged_datasets is False  # analyze's sample index is the line number
    assert cfg.datasets[0]["type"] == cfg.test_datasets[0]["type"] == "chat_template"


def test_plugin_passes_the_section_to_the_trainer():
    from axolotl.utils.dict import DictDefault

    from qtuning_plugin.axolotl.plugin import QTuningPlugin
    from qtuning_plugin.axolotl.trainer import AxolotlQTuningTrainer

    plugin = QTuningPlugin()
    on = DictDefault({"qtuning": {"sample_keep_ratio": 0.5}})
    assert plugin.get_trainer_cls(on) is AxolotlQTuningTrainer
    assert plugin.get_training_args(on)["qtuning"]["sample_keep_ratio"] == 0.5
    off = DictDefault({"qtuning": {"enabled": False}})
    assert plugin.get_trainer_cls(off) is None and plugin.get_training_args(off) == {}
    assert plugin.get_trainer_cls(DictDefault({})) is None


# ------------------------------------------------------------------ tiny model
def test_shipped_dataset_is_chat_rows():
    from qtuning_plugin.tiny import dataset_path

    path = dataset_path()
    assert path.stat().st_size < 200_000
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert 300 <= len(rows) <= 400
    for row in rows:
        roles = [message["role"] for message in row["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), roles
        assert all(message["content"] for message in row["messages"])


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory):
    from qtuning_plugin.tiny import build_tiny_model

    base = tmp_path_factory.mktemp("tiny")
    return {
        "a": build_tiny_model(base / "a", seed=0),
        "b": build_tiny_model(base / "b", seed=0),
        "c": build_tiny_model(base / "c", seed=1),
    }


def test_build_tiny_model_is_deterministic(tiny_builds):
    a, b, c = tiny_builds["a"], tiny_builds["b"], tiny_builds["c"]
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()  # the seed is the weights'


def test_build_tiny_model_skips_a_complete_build(tiny_builds, tmp_path):
    from qtuning_plugin import tiny

    path = tiny_builds["a"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.is_built(path, seed=0) and not tiny.is_built(path, seed=1)
    assert tiny.build_tiny_model(path, seed=0) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not tiny.is_built(tmp_path)


def test_tiny_model_and_tokenizer_load(tiny_builds):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_builds["a"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings) == (4, 2, 512)
    assert not config.tie_word_embeddings and config.vocab_size == len(tokenizer) == 512
    assert next(model.parameters()).dtype == torch.float32
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.eos_token_id) == 2


def test_build_tiny_command_and_main_write_the_same_model(tiny_builds, tmp_path):
    """`axolotl qtuning build-tiny DIR` (click, in-process) and `qtuning-build-tiny DIR` (argparse)."""
    from click.testing import CliRunner

    from qtuning_plugin.axolotl.cli import qtuning
    from qtuning_plugin.tiny import main

    result = CliRunner().invoke(qtuning, ["build-tiny", str(tmp_path / "cli"), "--seed", "0"])
    assert result.exit_code == 0, result.output
    main([str(tmp_path / "script"), "--seed", "0"])
    reference = (tiny_builds["a"] / "model.safetensors").read_bytes()
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == reference
    assert (tmp_path / "script" / "model.safetensors").read_bytes() == reference
