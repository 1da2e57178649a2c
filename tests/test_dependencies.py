"""Declared = used: every third-party module the package imports is declared in pyproject.toml, and
every declared dependency is imported by the package or named by a shipped config (a logger)."""

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"nltk", "gradio"}  # extras: `nouns` (imported only when installed), `app` (the web demo)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]) for d in deps}


def _imported() -> set[str]:
    modules = set()
    for path in (ROOT / "src/odise_pl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "odise_pl"}


def test_every_imported_module_is_declared():
    dists = md.packages_distributions()
    undeclared = [
        m for m in _imported() - OPTIONAL if not {_norm(d) for d in dists.get(m, [m])} & _declared()
    ]
    assert not undeclared, undeclared


def test_every_declared_dependency_is_used():
    dists = md.packages_distributions()
    used = {_norm(d) for m in _imported() for d in dists.get(m, [m])}
    configs = " ".join(p.read_text() for p in (ROOT / "conf").rglob("*.yaml"))
    by_config = {
        "wandb": "wandb_logger",
        "tensorboard": "TensorBoardLogger",
        "hydra-submitit-launcher": "submitit_slurm",
    }
    unused = [d for d in _declared() - used if by_config.get(d) not in configs or d not in by_config]
    assert not unused, unused
