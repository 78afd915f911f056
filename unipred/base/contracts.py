"""The contracts a modality implements, written as ``typing.Protocol``s, and the checks that run
when a plugin registers something (so a missing piece fails at registration, in one line that
names it, not at the first forward pass).

* :class:`Tokenizer` -- raw samples -> ``Tokens``; registered with ``@TOKENIZERS.register``.
* :class:`DatasetBuilder` -- what a task provides to the engine for its data.
* The streaming-dataset resume contract lives next to the loader that uses it
  (``unipred.data.loader``).

docs/adding-a-modality.md walks through a complete plugin.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch

from unipred.base.tokens import Tokens


@runtime_checkable
class Tokenizer(Protocol):
    """Turns a batch of raw samples into ``Tokens(tokens (B, N, D), coords (N, k) or (B, N, k)
    in [-1, 1], valid (B, N) or None)``.

    Optional, and used when present: ``patches(x) -> (B, N, P)``, the raw values behind each
    token in token order (pixels, log-mel patch, voxels, waveform frame), with ``patch_dim`` = P.
    ``model.objective.target=patch`` predicts them and every evaluation's raw-input baseline
    (unipred.protocols.baselines) is k-NN / linear on them flattened.

    Built as ``cls(dim=D, **model.tokenizer_args)``. ``coord_dims`` (k) is a class attribute:
    the predictor's RoPE is sized from it before the model is built. ``example_input(b)``
    returns a batch the tokenizer accepts, for automatic tests."""

    dim: int
    coord_dims: int

    def __call__(self, x: Any) -> Tokens: ...

    def example_input(self, batch_size: int = 2) -> Any: ...


class DatasetBuilder(Protocol):
    """What a task gives the engine for its data (``unipred.task.Task`` implements it).

    ``build_dataset("train" | "val")`` returns a map-style or iterable dataset, or None when the
    split is absent; with ``data.root`` empty it must generate data (the smoke tests rely on
    it). ``collate_fn(split)`` may return a collate function (padding, Mixup) or None."""

    def build_dataset(self, split: str) -> torch.utils.data.Dataset | None: ...

    def collate_fn(self, split: str) -> Any: ...


class ContractError(TypeError):
    """A registration does not fulfil its contract; the message names what is missing."""


def _where(kind: str, name: str, cls: Any) -> str:
    """How an error names the registration: ``task 'x' (module.Class)``."""
    return f"{kind} {name!r} ({getattr(cls, '__module__', '?')}.{getattr(cls, '__name__', cls)})"


def check_tokenizer(name: str, cls: Any) -> None:
    """Fail at registration when a tokenizer class lacks part of :class:`Tokenizer`."""
    where = _where("tokenizer", name, cls)
    if not inspect.isclass(cls):
        raise ContractError(f"{where}: register a class, built as cls(dim=..., **tokenizer_args)")
    missing = []
    k = getattr(cls, "coord_dims", None)
    if not isinstance(k, int) or k < 1:
        missing.append("a class attribute coord_dims (int >= 1: the coordinates' dimensions)")
    if not callable(getattr(cls, "example_input", None)):
        missing.append("example_input(batch_size) (a batch it accepts, for automatic tests)")
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "dim" not in params and not takes_kwargs:
        missing.append("a constructor argument dim (the token width)")
    if missing:
        raise ContractError(f"{where} lacks " + "; ".join(missing))


# registration checks by name (``Registry(kind, check=NAME)``). A check of something defined
# in a higher layer is registered by that layer: unipred.task.checks adds check_task and
# check_data, so this module never imports the task layer.
CHECKS: dict[str, Any] = {"check_tokenizer": check_tokenizer}


def run_check(check: str, name: str, obj: Any) -> None:
    """Run the registration check ``check`` on ``obj`` registered as ``name``."""
    if check not in CHECKS:
        raise ContractError(f"no registration check {check!r}: import unipred first")
    CHECKS[check](name, obj)
