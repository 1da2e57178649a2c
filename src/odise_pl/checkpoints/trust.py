"""A stored model config is data: what a checkpoint's description may contain.

Eval, the demos and the notebooks rebuild a model by instantiating the config a checkpoint carries
(:mod:`odise_pl.checkpoints.description`). Instantiation calls whatever ``_target_`` names, so a
config read from a file could run any importable function (write or link files, download and run
code, load pickles by other means), and an interpolation (``${oc.env:HOME}``) reads the machine it
is resolved on. ``weights_only`` and safetensors protect the tensors; this module protects the
config, by Hugging Face's rule: a file never runs code unless the user says so
(``trust_checkpoint_config=true``).

Before anything is built a stored description must be plain data:

- every ``_target_`` one of :data:`MODEL_TARGETS`: the classes and weight loaders the shipped
  configs put under ``model:`` (``tests/test_checkpoint_trust.py`` keeps the list and ``conf/`` in
  step, so a new shipped target is a conscious decision);
- no Hydra keyword but ``_target_`` and ``_partial_`` (a ``_partial_`` only defers the call of an
  allowed target); no ``_args_``, ``_recursive_``, ``_convert_`` ...;
- no ``${...}`` in any key or value: no interpolation, no resolver;
- keys are strings, values JSON scalars (None, bool, int, float, str), lists and mappings of them;
- the other fields typed: ``format`` an int, ``experiment`` a string or None, ``vocabulary`` a
  list of lists of strings, ``isthing`` a list of booleans.

Anything else is :class:`UntrustedConfigError`: one line naming the key and the value.
"""

from __future__ import annotations

import re
from typing import Any

from odise_pl.errors import CheckpointError

KEY = "odise_pl"  # the checkpoint dict's key / the safetensors metadata key of a description
# 1: model / weights references (${weights.sd_source}) kept as interpolations; 2: plain values only.
FORMAT = 2
# The `_target_`s the shipped configs place under `model:` (conf/model, conf/backbone,
# conf/captioner, conf/experiment*, conf/ablation). Derived from conf/ by hand and checked
# against it by tests/test_checkpoint_trust.py.
MODEL_TARGETS = frozenset(
    {
        "odise_pl.lit_module.ODISELitModule",
        "odise_pl.inference.predictor.Predictor",
        "odise_pl.optim.WarmupMultiStepLR",
        "torch.optim.AdamW",
        "odise_pl.model.odise.ODISE",
        "odise_pl.model.diffusion_backbone.DiffusionBackbone",
        "odise_pl.model.timm_backbone.TimmBackbone",
        "odise_pl.model.text_encoder.SDTextEncoder",
        "odise_pl.model.clip.FrozenCLIP",
        "odise_pl.model.captioner.ImplicitCaptioner",
        "odise_pl.model.captioner.EmptyCaptioner",
        "odise_pl.model.captioner.TextCaptioner",
        "odise_pl.model.feature_pyramid.FeaturePyramid",
        "odise_pl.model.pixel_decoder.MSDeformAttnPixelDecoder",
        "odise_pl.model.transformer_decoder.MaskedTransformerDecoder",
        "odise_pl.model.mask_classifier.MaskClassifier",
        "odise_pl.loss.criterion.SetCriterion",
        "odise_pl.loss.matcher.HungarianMatcher",
        "odise_pl.loss.grounding.GroundingLoss",
        "odise_pl.weights.load_unet",
        "odise_pl.weights.load_vae",
        "odise_pl.weights.load_scheduler",
        "odise_pl.weights.load_text_encoder",
        "odise_pl.weights.load_open_clip",
        "odise_pl.weights.load_timm",
    }
)
# Hydra's keywords that a stored config may use; every other `_name_` is refused.
ALLOWED_KEYWORDS = frozenset({"_target_", "_partial_"})
TRUST_HINT = (
    "a checkpoint's config is data and may name only odise_pl's own model classes. If you wrote this "
    "model yourself and trust the file, pass trust_checkpoint_config=true (demo / app: "
    "--trust-checkpoint-config; Python: load_model(..., trust_config=True))"
)
_KEYWORD = re.compile(r"^_[A-Za-z0-9]+_$")
_SCALARS = (type(None), bool, int, float, str)
_MAX_DEPTH = 32


class UntrustedConfigError(CheckpointError):
    """A checkpoint's stored config names code, interpolates, or holds values of the wrong type."""


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a refusal quotes what it refused, not 2 MB of it)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse(source: Any, key: str, value: Any, why: str) -> UntrustedConfigError:
    return UntrustedConfigError(f"{source}: refused {key}={short(value)}: {why}; {TRUST_HINT}")


def check_plain_config(node: Any, source: Any, prefix: str, allow_refs: bool = False) -> None:
    """Raise :class:`UntrustedConfigError` unless ``node`` (a stored config node, as JSON-like data)
    is plain values whose ``_target_``s are all :data:`MODEL_TARGETS` (see the module docstring).

    ``allow_refs``: accept strings that are exactly one reference to another stored key,
    ``${weights.sd_source}`` / ``${model.net.pixel_decoder.conv_dim}`` (how descriptions of format 1 stored shared values; the
    caller substitutes them by lookup, never by OmegaConf resolution).
    """

    def walk(value: Any, key: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _refuse(source, key, "...", f"nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise _refuse(source, f"{key}.{k!r}", v, "config keys are strings")
                child = f"{key}.{k}"
                if "${" in k:
                    raise _refuse(source, child, v, "a key with an interpolation")
                if _KEYWORD.match(k) and k not in ALLOWED_KEYWORDS:
                    raise _refuse(source, child, v, f"Hydra keyword {k} is not allowed in a stored config")
                if k == "_target_" and v not in MODEL_TARGETS:
                    raise _refuse(source, child, v, "not one of odise_pl's model classes")
                if k == "_partial_" and not isinstance(v, bool):
                    raise _refuse(source, child, v, "_partial_ is true or false")
                walk(v, child, depth + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]", depth + 1)
        elif not isinstance(value, _SCALARS) or isinstance(value, float) and value != value:
            raise _refuse(source, key, value, f"a {type(value).__name__} where plain values are expected")
        elif isinstance(value, str) and ("${" in value or "\\${" in value):
            if not (allow_refs and is_reference(value)):
                raise _refuse(source, key, value, "an interpolation; a stored config holds plain values")

    walk(node, prefix, 0)


_REFERENCE = re.compile(r"^\$\{((?:model|weights)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\}$")


def is_reference(value: Any) -> bool:
    """A whole string that is one reference, like ``${weights.mode}``."""
    return isinstance(value, str) and _REFERENCE.match(value) is not None


def substitute_references(desc: dict, source: Any) -> dict:
    """Format-1 descriptions kept shared values as references (``${weights.sd_source}``): replace
    each by the value it names in ``desc`` itself, by dictionary lookup (no resolver can run);
    a reference to a missing key, or a chain of references, is refused.
    """

    def lookup(path: str, key: str) -> Any:
        node: Any = desc
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise _refuse(source, key, f"${{{path}}}", "a reference to a key the file does not hold")
            node = node[part]
        if isinstance(node, (dict, list)) or is_reference(node):
            raise _refuse(source, key, f"${{{path}}}", "a reference to a node or to another reference")
        return node

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if is_reference(value):
            return lookup(_REFERENCE.match(value).group(1), key)
        return value

    out = {k: walk(v, k) if k in ("model", "weights") else v for k, v in desc.items()}
    return {**out, "format": FORMAT}  # now plain values: what format 2 stores


def check_description(desc: Any, source: Any, trust: bool = False) -> dict:
    """The description ``desc`` (read from ``source``) checked as data (the module docstring's
    rules; ``trust=True`` skips the config rules, never the structure) and with format-1
    references substituted. Raises :class:`UntrustedConfigError` / :class:`CheckpointError`.
    """
    if not isinstance(desc, dict) or not isinstance(desc.get("model"), dict):
        raise CheckpointError(f"{source}: the {KEY!r} description holds no model config")
    fmt = desc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or not 1 <= fmt <= FORMAT:
        raise CheckpointError(
            f"{source}: description format {short(fmt)} is not one this version reads (1-{FORMAT}); "
            "update odise_pl"
        )
    if trust:
        return substitute_references(desc, source) if fmt == 1 else desc
    for field, ok, what in (
        ("experiment", lambda v: v is None or isinstance(v, str), "a string"),
        ("weights", lambda v: v is None or isinstance(v, dict), "a mapping"),
        (
            "vocabulary",
            lambda v: (
                v is None
                or isinstance(v, list)
                and all(isinstance(n, list) and n and all(isinstance(s, str) for s in n) for n in v)
            ),
            "a list of synonym lists (strings)",
        ),
        (
            "isthing",
            lambda v: (
                v is None
                or isinstance(v, list)
                and all(isinstance(t, (bool, int)) and t in (0, 1) for t in v)
            ),
            "a list of booleans",
        ),
    ):
        if not ok(desc.get(field)):
            raise _refuse(source, field, desc.get(field), f"expected {what}")
    unknown = sorted(set(desc) - {"format", "experiment", "model", "weights", "vocabulary", "isthing"})
    if unknown:
        raise _refuse(source, unknown[0], desc[unknown[0]], "not a field of a description")
    for field in ("model", "weights"):
        if desc.get(field) is not None:
            check_plain_config(desc[field], source, field, allow_refs=fmt == 1)
    return substitute_references(desc, source) if fmt == 1 else desc
