"""Every config key our messages tell users to set exists: each ``key=value`` suggested in a string
of ``src/`` composes with Hydra (against train.yaml, or eval.yaml for its own keys), and each bare
``group.key`` named is a key of the composed config. A hint that does not compose is a bug."""

import ast
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from odise_pl.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
GROUPS = (
    "model|data|trainer|weights|paths|callbacks|logger|captioner|backbone|experiment|debug|ablation|datasets"
)
TOP = "ckpt_path|train_vocabulary|max_images|seed|device|validate_before_training"
ASSIGN = re.compile(rf"(?<![\w./-])((?:{GROUPS})(?:\.[\w]+)*|{TOP})=(\[[^\]]*\]|[^\s`'\",;)]+)")
BARE = re.compile(rf"(?<![\w./-])((?:{GROUPS})\.[a-z_]+(?:\.[a-z_0-9]+)*)(?![\w=(/-])")


def _strings() -> list[tuple[str, str]]:
    """(file, text) of every string literal in the source (f-strings' literal parts included)."""
    out = []
    for path in (ROOT / "src/odise_pl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((path.relative_to(ROOT).as_posix(), node.value))
    return out


def _hints() -> tuple[set[tuple[str, str]], set[str]]:
    assigns, bare = set(), set()
    for _, text in _strings():
        for key, value in ASSIGN.findall(text):
            value = value.rstrip(".:")
            value = value.rstrip("]") if "[" not in value else value
            if value:
                assigns.add((key, value))
        for key in BARE.findall(text):
            if not key.endswith((".py", ".yaml", ".json", ".txt", ".ckpt")):
                bare.add(key.rstrip("."))
    return assigns, bare


def _compose(*overrides: str):
    """The composed config of the first context the overrides fit: training, evaluation, or
    training with a timm backbone (whose own keys only exist there)."""
    errors = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for name, extra in (("train", []), ("eval", []), ("train", ["backbone=clip_l"])):
            try:
                return compose(name, overrides=[*extra, *overrides])
            except Exception as err:  # noqa: PERF203
                errors.append(f"{name} {extra}: {err}")
    raise AssertionError("; ".join(errors))


def test_hints_are_found():
    assigns, bare = _hints()
    assert ("model.predictor.mode", "diffusion") in assigns and "model.optimizer.lr" in bare


@pytest.mark.parametrize("key,value", sorted(_hints()[0]))
def test_suggested_override_composes(key, value):
    if "*" in value or "..." in value:  # a pattern such as experiment=caption_*: some option must match
        group = Path(CONFIG_DIR) / key
        assert any(group.glob(value.replace("...", "*") + ".yaml")), f"{key}={value} matches no option"
        return
    value = value if not value.startswith("<") else "1"  # a placeholder such as <pixels>
    _compose(f"{key}={value}")


def _has(cfg, key: str) -> bool:
    """Whether ``key`` is a node of ``cfg`` (without resolving interpolations)."""
    node = cfg
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node._get_node(part)
    return True


def test_every_named_key_exists():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        contexts = [
            compose("train"),
            compose("eval"),
            compose("train", overrides=["trainer=ddp", "backbone=clip_l"]),
        ]
    missing = []
    for key in sorted(_hints()[1]):
        if key.split(".")[0] in ("captioner", "backbone", "experiment", "debug", "ablation", "datasets"):
            continue  # groups, not keys
        if not any(_has(c, key) for c in contexts):
            missing.append(key)
    assert not missing, missing
