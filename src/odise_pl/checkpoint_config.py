"""Self-describing checkpoints: the model a checkpoint was trained as travels inside the file.

A ``.ckpt`` written by ``odise_pl.train`` holds, under ``checkpoint["odise_pl"]``, the resolved
``model`` and ``weights`` config nodes, the experiment's name and the training vocabulary /
supervision; ``python -m odise_pl.checkpoint export`` and the official-checkpoint converter put the
same description (JSON) into the ``.safetensors`` metadata. ``python -m odise_pl.eval ckpt_path=X``,
the demo and :func:`odise_pl.inference.segment.load_model` then rebuild that model from the file
alone.

What the user gives explicitly still counts, per kind of key:

- the architecture and what was trained (``model.*`` except ``model.predictor``, ``weights.mode``,
  ``weights.clip_name``): given and different from the file is a :class:`ConfigError` naming both
  values (a mismatch would otherwise load wrong-shaped or wrongly-paired weights);
- where frozen weights are found (``weights.sd_source``, ``weights.clip_pretrained``): paths on the
  training machine mean nothing on another, so the user's value wins;
- test-time settings (``model.predictor.*``): the user's value wins, the file's is the default.

"Given" is measured against the config composed with no overrides, so a group choice
(``experiment=caption_512``) counts as much as a single key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from odise_pl.errors import CheckpointError, ConfigError

KEY = "odise_pl"  # the checkpoint dict's key / the safetensors metadata key
FORMAT = 1
# Keys the user's value wins for: test-time settings, and where frozen weights are found (the
# training machine's paths mean nothing on another).
_USER_WINS = ("model.predictor", "weights.sd_source", "weights.clip_pretrained")
_LOCATION_LEAVES = ("source", "pretrained", "checkpoint", "cache_dir")


def _keep_interpolation(value: Any) -> bool:
    """A ``${model.*}`` / ``${weights.*}`` reference resolves the same in any run's config; any
    other (``${trainer.max_steps}``) is stored as its value.
    """
    refs = re.findall(r"\$\{([^}]*)\}", value) if isinstance(value, str) else []
    return bool(refs) and all(r.startswith(("model.", "weights.")) for r in refs)


def _model_node(cfg: DictConfig) -> dict:
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    resolved = OmegaConf.to_container(cfg.model, resolve=True)

    def merge(r: Any, v: Any) -> Any:
        if isinstance(r, dict):
            return {k: merge(r[k], v[k]) for k in r}
        if isinstance(r, list):
            return [merge(a, b) for a, b in zip(r, v)]
        return r if _keep_interpolation(r) else v

    return merge(raw, resolved)


def describe(cfg: DictConfig, experiment: str | None = None) -> dict[str, Any]:
    """The description of a training run's model (JSON-serialisable); ``experiment`` defaults to
    the running Hydra app's ``experiment=`` choice. References to ``weights.*`` stay references,
    so a machine with the frozen weights elsewhere only sets ``weights.sd_source`` etc.
    """
    if experiment is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            experiment = HydraConfig.get().runtime.choices.get("experiment")
        except ValueError:  # not inside a Hydra app (tests, notebooks)
            experiment = None
    return {
        "format": FORMAT,
        "experiment": experiment,
        "model": _model_node(cfg),
        "weights": OmegaConf.to_container(cfg.weights, resolve=True),
    }


def read_description(path: str | Path) -> dict[str, Any] | None:
    """The description stored in a ``.ckpt`` or ``.safetensors`` file; ``None`` for files written
    without one (older runs, other tools).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(KEY)
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
        if text is None:
            return None
        try:
            desc = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: the {KEY!r} metadata is not JSON ({err})") from err
    else:
        from odise_pl.checkpoint import read_checkpoint

        desc = read_checkpoint(path).get(KEY)
    if desc is None:
        return None
    if not isinstance(desc, dict) or not isinstance(desc.get("model"), dict):
        raise CheckpointError(f"{path}: the {KEY!r} description holds no model config")
    return desc


def safetensors_metadata(desc: dict | None) -> dict[str, str]:
    """The metadata of an exported ``.safetensors`` file (string values only, as the format wants)."""
    return {KEY: json.dumps(desc)} if desc else {}


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    """``model.*`` / ``weights.*`` leaves of a config, resolved, by dotted key."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}")
        else:
            out[prefix] = node

    for name in ("model", "weights"):
        walk(OmegaConf.to_container(cfg[name], resolve=True), name)
    return out


def _user_wins(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _LOCATION_LEAVES or any(
        key == p or key.startswith(p + ".") for p in _USER_WINS
    )


def apply_description(cfg: DictConfig, baseline: DictConfig, desc: dict, source: str | Path) -> DictConfig:
    """``cfg`` with the ``model`` / ``weights`` nodes of ``desc`` (read from ``source``).

    ``baseline``: the same config composed without overrides; what differs from it was given.
    Given test-time settings and weight locations are kept; any other given value the file
    contradicts is a :class:`ConfigError` naming both.
    """
    ours, base = _leaves(cfg), _leaves(baseline)
    given = {k: v for k, v in ours.items() if k not in base or base[k] != v}
    out = cfg.copy()
    with open_dict(out):
        out.model = OmegaConf.create(desc["model"])
        if desc.get("weights"):
            out.weights = OmegaConf.create(desc["weights"])
        for k, v in given.items():
            if _user_wins(k):
                OmegaConf.update(out, k, v, force_add=True)
    theirs = _leaves(out)
    clashes = [
        f"{k}={given[k]!r} (the checkpoint: {theirs[k]!r})"
        for k in sorted(given)
        if not _user_wins(k) and k in theirs and theirs[k] != given[k]
    ]
    if clashes:
        raise ConfigError(
            f"{source} was trained as another model than the one asked for: "
            + "; ".join(clashes[:5])
            + (f"; and {len(clashes) - 5} more" if len(clashes) > 5 else "")
            + ". Drop these overrides (and experiment=): the checkpoint's own configuration is used"
        )
    return out


def baseline_config(config_name: str) -> DictConfig:
    """``config_name`` composed with no overrides (inside a running Hydra app or outside one)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from odise_pl.config import CONFIG_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(config_name)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name)


def resolve_from_checkpoint(
    cfg: DictConfig, path: str | Path | None, config_name: str
) -> tuple[DictConfig, dict | None]:
    """(config, description): ``cfg`` rebuilt as the model stored in ``path`` when the file
    describes itself, else ``cfg`` unchanged (and ``None``).
    """
    if not path:
        return cfg, None
    desc = read_description(path)
    if desc is None:
        return cfg, None
    return apply_description(cfg, baseline_config(config_name), desc, path), desc
