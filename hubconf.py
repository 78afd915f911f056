"""torch.hub entry points: ``torch.hub.load("REPO_OR_FOLDER", "nepa", pretrained=...)``.

    model = torch.hub.load("/path/to/unipred", "nepa", source="local", pretrained="runs/export")
    model = torch.hub.load("/path/to/unipred", "nepa", source="local", name="nepa_vit_b14")

``pretrained`` is anything ``NEPA.from_pretrained`` takes (a save_pretrained folder, a Hub repo
id, an official NEPA folder); without it, ``name`` picks a registered size (random weights) and
keyword arguments override its fields. Works from an installed unipred or a bare source tree.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

dependencies = ["torch", "safetensors", "omegaconf"]

_ROOT = Path(__file__).resolve().parent


def _ensure_unipred() -> None:
    """In a bare source tree (torch.hub's download) tokenizers/, tasks/ and configs/ are not
    yet installed as unipred.tokenizers / unipred.tasks / unipred.configs: map them."""
    import unipred

    for sub in ("tokenizers", "tasks", "configs"):
        name = f"unipred.{sub}"
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        init = _ROOT / sub / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(unipred, sub, mod)


def nepa(pretrained: str | None = None, name: str = "nepa_vit_b14", **overrides):
    """A NEPA model: ``pretrained`` weights (folder / repo id), or a registered size."""
    _ensure_unipred()
    from unipred.model import NEPA

    if pretrained:
        if overrides:
            raise TypeError(f"overrides {sorted(overrides)} cannot change a pretrained model")
        return NEPA.from_pretrained(pretrained)
    return NEPA.from_name(name, **overrides)


def nepa_vit_b14(pretrained: str | None = None, **overrides):
    """The released ViT-B/14 pretraining architecture (random weights unless ``pretrained``)."""
    return nepa(pretrained, "nepa_vit_b14", **overrides)


def nepa_vit_l14(pretrained: str | None = None, **overrides):
    """The released ViT-L/14 pretraining architecture (random weights unless ``pretrained``)."""
    return nepa(pretrained, "nepa_vit_l14", **overrides)
