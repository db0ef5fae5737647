"""Build the tiny random Llama model and its tokenizer, fully offline.

    qtuning-build-tiny examples/tiny-model            # console script
    axolotl qtuning build-tiny examples/tiny-model    # Axolotl CLI command

What it writes into the output directory (a normal Hugging Face model folder,
so that ``base_model: examples/tiny-model`` works in an Axolotl config):

* a byte-level BPE tokenizer (vocabulary 512) trained with `tokenizers` on the
  text of the shipped dataset ``qtuning_plugin/data/tiny_instruct.jsonl``,
  wrapped as a `transformers.PreTrainedTokenizerFast` with ``<s>`` (bos),
  ``<|im_end|>`` (eos), ``<pad>``, ``<unk>`` and a ChatML chat template
  (``<|im_start|>role\\n...<|im_end|>\\n``), so that Axolotl's
  ``type: chat_template`` datasets work with the default
  ``chat_template: tokenizer_default``;
* a randomly initialised `LlamaForCausalLM` (2 layers, hidden 64,
  intermediate 128, 4 heads, 2 KV heads, 512 positions, untied LM head),
  in float32 safetensors;
* ``qtuning-tiny.json``, a marker written last: a later call with the same
  builder version and seed finds it and skips the rebuild.

The build is deterministic: the same seed gives the same files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
from typing import Iterator, Optional, Sequence, Union

from qtuning_plugin import example_files
from qtuning_plugin.atomic_files import write_text

# Bump when the tokenizer, the model shape or the dataset changes: older folders get rebuilt.
BUILDER_VERSION = 1
MARKER = "qtuning-tiny.json"
DATASET = "tiny_instruct.jsonl"
VOCAB_SIZE = 512

BOS, EOS, PAD, UNK = "<s>", "<|im_end|>", "<pad>", "<unk>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [UNK, BOS, PAD, IM_START, EOS]

# ChatML with a leading bos token, as Llama-style tokenizers do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Files a complete build holds (besides the marker).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def dataset_path() -> pathlib.Path:
    """The shipped instruction dataset (JSON lines, ``messages: [{role, content}, ...]``)."""
    return example_files.dataset_path(DATASET)


def _training_text() -> Iterator[str]:
    """Every conversation of the shipped dataset, rendered as the chat template renders it."""
    with open(dataset_path(), encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                for message in json.loads(line)["messages"]:
                    yield f"{message['role']}\n{message['content']}\n"


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on the shipped dataset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_text(), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    # Plain encoding adds bos (as Llama's tokenizer does); the chat template writes its own.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, *, seed: int = 0):
    """A random-init float32 `LlamaForCausalLM` sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    config.dtype = "float32"
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model


def _marker_payload(seed: int) -> dict:
    return {"builder_version": BUILDER_VERSION, "seed": seed, "vocab_size": VOCAB_SIZE, **MODEL_SHAPE}


def is_built(output_dir: Union[str, pathlib.Path], *, seed: int = 0) -> bool:
    """Whether ``output_dir`` holds a complete model from this builder version and ``seed``."""
    path = pathlib.Path(output_dir)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == _marker_payload(seed) and all((path / name).is_file() for name in REQUIRED_FILES)


def build_tiny_model(output_dir: Union[str, pathlib.Path], *, seed: int = 0) -> pathlib.Path:
    """Build (or find already built) the tiny model and tokenizer in ``output_dir``.

    Returns:
        The resolved output directory.
    """
    path = pathlib.Path(output_dir).expanduser().resolve()
    if is_built(path, seed=seed):
        return path
    missing = [name for name in ("transformers", "tokenizers") if importlib.util.find_spec(name) is None]
    if missing:  # before the folder is made: a failed build leaves nothing behind
        raise ModuleNotFoundError(
            f"building the tiny model needs {' and '.join(missing)}: pip install 'qtuning-plugin[hf]'"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)  # an interrupted rebuild must not look complete

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    tokenizer.save_pretrained(str(path))
    model.save_pretrained(str(path), safe_serialization=True)
    write_text(str(path / MARKER), json.dumps(_marker_payload(seed), indent=2, sort_keys=True) + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qtuning-build-tiny",
        description="Build the tiny random Llama model and tokenizer for the CPU example, offline.",
    )
    parser.add_argument("output_dir", help="folder to write the model into (e.g. examples/tiny-model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.output_dir, seed=args.seed)
    except ModuleNotFoundError as error:
        parser.exit(1, f"qtuning-build-tiny: {error}\n")
    print(f"tiny model and tokenizer saved to {path}")


if __name__ == "__main__":
    main()
