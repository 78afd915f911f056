"""torch.hub entry points: ``torch.hub.load("REPO_OR_FOLDER", "nepa", pretrained=...)``.

    model = torch.hub.load("/path/to/unipred", "nepa", source="local", pretrained="runs/export")
    model = torch.hub.load("/path/to/unipred", "nepa_vit_b14", source="local")

``pretrained`` is anything ``NEPA.from_pretrained`` takes (a save_pretrained folder, a Hub repo
id, an official NEPA folder); without it, ``name`` picks a registered size (random weights) and
keyword arguments override its fields. Every entry returns the model in eval mode, as
``from_pretrained`` does (``model.train()`` to train it). The named entries
(``nepa_vit_b14``, ``nepa_vit_l14``) refuse weights of another architecture.

Everything is imported from the checkout this file sits in, never from another unipred on the
path (a pip-installed one would otherwise lend its tokenizers to this checkout's core). When a
different unipred is already imported in the process, loading stops with one line saying so:
use a new Python process for the checkout, or that unipred's own ``NEPA.from_pretrained``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

dependencies = ["torch", "safetensors", "omegaconf"]

_ROOT = Path(__file__).resolve().parent
# unipred.<sub> lives at the checkout's root (installed as unipred.<sub> by pyproject.toml)
_TOP = ("tokenizers", "tasks", "configs")


def _where(name: str) -> Path:
    """The folder or file stem of module ``name`` inside this checkout."""
    parts = name.split(".")[1:]
    if parts and parts[0] in _TOP:
        return _ROOT.joinpath(*parts)
    return _ROOT.joinpath("unipred", *parts)


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``unipred`` and its sub-packages in this checkout, before any other finder (an
    editable install's finder of another tree included)."""

    def find_spec(self, name, path=None, target=None):
        if name != "unipred" and not name.startswith("unipred."):
            return None
        base = _where(name)
        if (base / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(
                name, base / "__init__.py", submodule_search_locations=[str(base)]
            )
        if base.with_suffix(".py").is_file():
            return importlib.util.spec_from_file_location(name, base.with_suffix(".py"))
        return None


def _outside(module) -> Path | None:
    """The file of an imported unipred module when it is not this checkout's, else None."""
    f = getattr(module, "__file__", None)
    if not f:
        return None
    f = Path(f).resolve()
    return None if f.is_relative_to(_ROOT) else f


def _ensure_unipred() -> None:
    """Import unipred from this checkout only (see the module docstring)."""
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        for name, mod in list(sys.modules.items()):
            if name == "unipred" or name.startswith("unipred."):
                other = _outside(mod)
                if other is not None:
                    raise ImportError(
                        f"torch.hub: {_ROOT} cannot run with the unipred already imported in "
                        f"this process from {other.parent}; load it from a new Python process "
                        "(or use that unipred's NEPA.from_pretrained)"
                    )
        sys.meta_path.insert(0, _CheckoutFinder())
    import unipred  # noqa: F401  (this checkout's, through the finder)


def _eval(model):
    from unipred.weights.pretrained import for_inference

    return for_inference(lambda: model)()


def nepa(pretrained: str | None = None, name: str | None = None, **overrides):
    """A NEPA model: ``pretrained`` weights (folder / repo id), or a registered size
    (``name``, default nepa_vit_b14) with random weights. With both, the weights must be of
    that size's architecture. Eval mode either way."""
    _ensure_unipred()
    from unipred.nn.model import NEPA

    if pretrained:
        if overrides:
            raise TypeError(f"overrides {sorted(overrides)} cannot change a pretrained model")
        model = NEPA.from_pretrained(pretrained)
        if name:
            _check_architecture(model, name, pretrained)
        return model
    return _eval(NEPA.from_name(name or "nepa_vit_b14", **overrides))


def _check_architecture(model, name: str, src) -> None:
    """ValueError (one line) when ``model`` is not of the registered size ``name``: width,
    depth, heads, tokenizer and patch (a classifier of that backbone is accepted)."""
    from unipred.nn.model import model_config

    want, got = model_config(name), model.cfg

    def shape(c):
        p = c.predictor
        return {"dim": p.dim, "depth": p.depth, "heads": p.heads, "tokenizer": c.tokenizer,
                "patch_size": c.tokenizer_args.get("patch_size")}  # fmt: skip

    a, b = shape(want), shape(got)
    diff = [f"{k} {b[k]} (not {a[k]})" for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(
            f"pretrained={src} is not a {name} model: {', '.join(diff)}; use the 'nepa' entry "
            "for any architecture"
        )


def nepa_vit_b14(pretrained: str | None = None, **overrides):
    """The released ViT-B/14 pretraining architecture (random weights unless ``pretrained``)."""
    return nepa(pretrained, "nepa_vit_b14", **overrides)


def nepa_vit_l14(pretrained: str | None = None, **overrides):
    """The released ViT-L/14 pretraining architecture (random weights unless ``pretrained``)."""
    return nepa(pretrained, "nepa_vit_l14", **overrides)
