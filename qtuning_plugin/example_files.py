"""The example configs and datasets shipped in the package, and `axolotl qtuning examples DIR`
(`qtuning-llamafactory examples DIR`: LLaMA-Factory's only).

The configs live once, in the repository's ``examples/`` (the package reaches them through the
link ``qtuning_plugin/examples``); the datasets in ``qtuning_plugin/data/``. In the repository
their paths are relative to its root (``base_model: examples/smollm2-135m-instruct``,
``path: qtuning_plugin/data/smollm2_instruct.jsonl``). `write_examples` writes copies whose
paths are absolute, so that they work from wherever they are run:

* ``examples/NAME`` becomes ``DIR/NAME``: the model folders sit next to the configs
  (``axolotl qtuning fetch-smollm2 DIR/smollm2-135m-instruct``);
* ``qtuning_plugin/data/FILE`` becomes the installed package's copy of FILE.

Comments change the same way, so the commands they quote stay right.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Union

from qtuning_plugin.atomic_files import write_text

REPO_EXAMPLES = "examples/"
REPO_DATA = "qtuning_plugin/data/"
#: The example configs of each host, by file name: Axolotl's ``.yml``, LLaMA-Factory's ``.yaml``.
AXOLOTL, LLAMAFACTORY = "*.yml", "*.yaml"


def package_dir(name: str) -> Path:
    """A folder of the installed package: ``data`` or ``examples``."""
    return Path(str(resources.files("qtuning_plugin") / name))


def dataset_path(name: str) -> Path:
    """A dataset shipped in ``qtuning_plugin/data/``."""
    return package_dir("data") / name


def example_configs(*patterns: str) -> list[Path]:
    """The shipped example configs matching ``patterns`` (default: every host's), by name."""
    folder = package_dir("examples")
    return sorted(path for pattern in patterns or (AXOLOTL, LLAMAFACTORY) for path in folder.glob(pattern))


def localise(text: str, target: Path) -> str:
    """An example config's text with the repository-relative paths made absolute for ``target``."""
    text = text.replace(REPO_DATA, f"{package_dir('data').resolve()}/")
    return text.replace(REPO_EXAMPLES, f"{target}/")


def write_examples(target: Union[str, Path], *patterns: str) -> list[Path]:
    """Write the example configs matching ``patterns`` (default: all) into ``target`` (made if missing)
    with absolute paths; their paths."""
    target = Path(target).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for config in example_configs(*patterns):
        path = target / config.name
        write_text(str(path), localise(config.read_text(encoding="utf-8"), target))
        written.append(path)
    return written
