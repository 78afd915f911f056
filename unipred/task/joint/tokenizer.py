"""The joint tokenizer: every source's own tokenizer, an optional learned embedding per source,
and one shared RoPE coordinate space (``default_axes``, ``joint_input``)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from unipred.base.registry import TOKENIZERS
from unipred.base.tokens import Tokens
from unipred.nn.model import build_tokenizer
from unipred.nn.rope import lift_coords

AXIS_NAMES = ("t", "y", "x")  # the default 3-axis space; docs/joint.md
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a source name


def default_axes(k: int, space: int) -> list[int] | None:
    """Where a tokenizer's k coordinates go in the (t, y, x) space when the config does not
    say: 1 axis -> t (a sequence), 2 -> (y, x) (an image grid), ``space`` -> all of them."""
    if k == space:
        return list(range(k))
    if space == 3:
        return {1: [0], 2: [1, 2]}.get(k)
    return None


def joint_input(source: str, x: Any) -> dict:
    """The model input of a joint batch: which source, and that source's own model input."""
    return {"source": source, "input": x}


# ------------------------------------------------------------------------------ tokenizer
@TOKENIZERS.register("joint")
class JointTokenizer(nn.Module):
    """{"source": NAME, "input": x} -> that source's tokenizer's Tokens, coordinates lifted into
    the shared ``space``-D RoPE space (unused axes 0), plus the source's modality embedding.

    ``sources``: name -> {"tokenizer": registered name, "args": tokenizer args, "axes": RoPE
    axis of each of its coordinates (None: :func:`default_axes`)}.
    """

    coord_dims = 3  # (t, y, x); an instance built with another ``space`` says so itself

    def __init__(self, dim: int, sources: dict | None = None, space: int = 3,
                 modality_embedding: bool = False):  # fmt: skip
        super().__init__()
        if sources is None:  # an example: every registered tokenizer that builds by default
            sources = _every_tokenizer(dim, int(space))
        if not sources:
            raise ValueError("the joint tokenizer needs at least one source")
        self.dim, self.space, self.coord_dims = dim, int(space), int(space)
        self.tokenizers = nn.ModuleDict()
        self.axes: dict[str, list[int]] = {}
        for name, spec in sources.items():
            if not _NAME.match(name):
                raise ValueError(f"joint source name {name!r}: use letters, digits and _")
            tok = build_tokenizer(spec["tokenizer"], dim, dict(spec.get("args") or {}))
            axes = spec.get("axes")
            axes = default_axes(tok.coord_dims, self.space) if axes is None else list(axes)
            if axes is None:
                raise ValueError(
                    f"data.sources.{name}.axes: the {spec['tokenizer']!r} tokenizer has "
                    f"{tok.coord_dims} coordinate axes; say where they go in the "
                    f"{self.space}-axis RoPE space (e.g. axes: {list(range(tok.coord_dims))})"
                )
            axes = [int(a) for a in axes]
            if (
                len(axes) != tok.coord_dims
                or len(set(axes)) != len(axes)
                or min(axes) < 0
                or max(axes) >= self.space
            ):
                raise ValueError(
                    f"data.sources.{name}.axes={axes}: need {tok.coord_dims} distinct axes in "
                    f"[0, {self.space}) (the {spec['tokenizer']!r} tokenizer's coordinates)"
                )
            self.tokenizers[name] = tok
            self.axes[name] = axes
            # the layout travels in the state dict, so a checkpoint alone says where each
            # source's coordinates went (checked when it initialises a single-modality model)
            self.register_buffer(
                f"layout_{name}", torch.tensor([self.space, *axes], dtype=torch.float32)
            )
        self.modality = (
            nn.ParameterDict({n: nn.Parameter(torch.zeros(dim)) for n in sources})
            if modality_embedding
            else None
        )

    def example_input(self, batch_size: int = 2) -> dict:
        name = next(iter(self.tokenizers))
        return joint_input(name, self.tokenizers[name].example_input(batch_size))

    def split(self, x) -> tuple[str, Any]:
        if not isinstance(x, dict) or "source" not in x or "input" not in x:
            raise ValueError(
                "the joint tokenizer expects {'source': NAME, 'input': batch} "
                f"(unipred.task.joint.joint_input), got {type(x).__name__}"
            )
        if x["source"] not in self.tokenizers:
            raise ValueError(
                f"joint input names source {x['source']!r}; this model has {list(self.tokenizers)}"
            )
        return x["source"], x["input"]

    def forward(self, x) -> Tokens:
        name, inner = self.split(x)
        t = self.tokenizers[name](inner)
        tokens = t.tokens
        if self.modality is not None:
            tokens = tokens + self.modality[name].to(tokens.dtype)
        return Tokens(tokens, lift_coords(t.coords, self.axes[name], self.space), t.valid)


def _every_tokenizer(dim: int, space: int) -> dict:
    out = {}
    for name in TOKENIZERS.names():
        if name == "joint":
            continue
        try:
            tok = build_tokenizer(name, dim, {})
        except Exception:  # noqa: BLE001 - needs arguments, or an optional library
            continue
        if default_axes(tok.coord_dims, space) is not None and _NAME.match(name):
            out[name] = {"tokenizer": name, "args": {}}
    return out
