"""Self-describing checkpoints: the model a checkpoint was trained as travels inside the file.

A ``.ckpt`` written by ``odise_pl.train`` holds, under ``checkpoint["odise_pl"]``, the resolved
``model`` and ``weights`` config nodes (plain values), the experiment's name and the training
vocabulary; ``python -m odise_pl.checkpoints export`` and the official-checkpoint converter put the
same description (JSON) into the ``.safetensors`` metadata. ``python -m odise_pl.eval ckpt_path=X``,
the demo and :func:`odise_pl.inference.segment.load_model` then rebuild that model from the file
alone, after :mod:`odise_pl.checkpoints.trust` has checked the description as data.

What the user gives explicitly still counts, per kind of key:

- the architecture and what was trained (``model.*`` except ``model.predictor``, ``weights.mode``,
  ``weights.clip_name``): given and different from the file is a :class:`ConfigError` naming both
  values (a mismatch would otherwise load wrong-shaped or wrongly-paired weights);
- where frozen weights are found (``weights.sd_source``, ``weights.unet_source``,
  ``weights.clip_pretrained`` and every ``source`` / ``unet_source`` / ``pretrained`` /
  ``checkpoint`` / ``cache_dir`` leaf): always the running config's
  (the user's or the shipped default), never the file's: paths on the training machine mean nothing
  on another, and a file does not choose what this machine reads;
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

from odise_pl.checkpoints.trust import FORMAT, KEY, UntrustedConfigError, short
from odise_pl.errors import ConfigError

# Keys the user's value wins for: test-time settings, and where frozen weights are found (the
# training machine's paths mean nothing on another).
_WEIGHT_LOCATIONS = ("sd_source", "unet_source", "clip_pretrained")  # under `weights`
_USER_WINS = ("model.predictor", "model.net.vocab_cache_mb", *(f"weights.{k}" for k in _WEIGHT_LOCATIONS))
_LOCATION_LEAVES = ("source", "unet_source", "pretrained", "checkpoint", "cache_dir")


def describe(cfg: DictConfig, experiment: str | None = None) -> dict[str, Any]:
    """The description of a training run's model (JSON-serialisable plain values: a stored config
    never interpolates); ``experiment`` defaults to the running Hydra app's ``experiment=`` choice.
    Where frozen weights are found is rebuilt from the loading machine's config
    (:func:`apply_description`).
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
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "weights": OmegaConf.to_container(cfg.weights, resolve=True),
    }


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


# Keys whose shipped configs hold either kind (SD v1's explicit taps, the other backbones' `auto`).
_EITHER = {"model.net.backbone.unet_block_indices": {"a list", "a string"}}


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _relink(stored: Any, raw: Any, resolved: Any, key: str, source: Any) -> Any:
    """The stored node with the running config's own ``${weights.*}`` references and weight
    locations put back (``raw``: the running config unresolved, ``resolved``: resolved), so that
    where frozen weights are read from is this machine's config, never the file's. A stored value
    of another kind than the running config's (a string where a number is) is refused.
    """
    want, got = _kind(resolved), _kind(stored)
    if want and got and want != got and {want, got} != _EITHER.get(key):
        raise UntrustedConfigError(
            f"{source}: refused {key}={short(stored)}: the shipped config has {want} there ({short(resolved)})"
        )
    if isinstance(stored, dict):
        raw = raw if isinstance(raw, dict) else {}
        resolved = resolved if isinstance(resolved, dict) else {}
        return {k: _relink(v, raw.get(k), resolved.get(k), f"{key}.{k}", source) for k, v in stored.items()}
    if (
        isinstance(raw, str)
        and "${" in raw
        and all(r.startswith("weights.") for r in re.findall(r"\$\{([^}]*)\}", raw))
    ):
        return raw
    if key.rsplit(".", 1)[-1] in _LOCATION_LEAVES:
        return raw  # this machine's (None where its config has none): a file never names what is read
    return stored


def apply_description(cfg: DictConfig, baseline: DictConfig, desc: dict, source: str | Path) -> DictConfig:
    """``cfg`` with the ``model`` / ``weights`` nodes of ``desc`` (read from ``source`` and checked
    by :func:`odise_pl.checkpoints.trust.check_description`).

    ``baseline``: the same config composed without overrides; what differs from it was given.
    Weight locations are always ``cfg``'s; given test-time settings are kept; any other given value
    the file contradicts is a :class:`ConfigError` naming both.
    """
    ours, base = _leaves(cfg), _leaves(baseline)
    given = {k: v for k, v in ours.items() if k not in base or base[k] != v}
    out = cfg.copy()
    raw = {n: OmegaConf.to_container(cfg[n], resolve=False) for n in ("model", "weights")}
    res = {n: OmegaConf.to_container(cfg[n], resolve=True) for n in ("model", "weights")}
    with open_dict(out):
        out.model = OmegaConf.create(_relink(desc["model"], raw["model"], res["model"], "model", source))
        if desc.get("weights"):
            weights = _relink(desc["weights"], raw["weights"], res["weights"], "weights", source)
            for k in _WEIGHT_LOCATIONS:  # this machine's
                if k in raw["weights"]:
                    weights[k] = raw["weights"][k]
            out.weights = OmegaConf.create(weights)
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


def resolve_from_checkpoint(cfg: DictConfig, desc: dict | None, source: Any, config_name: str) -> DictConfig:
    """``cfg`` rebuilt as the model ``desc`` describes (the checked description of the checkpoint
    ``source``), or ``cfg`` unchanged when the file has none.
    """
    if desc is None:
        return cfg
    return apply_description(cfg, baseline_config(config_name), desc, source)
