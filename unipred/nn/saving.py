"""``NEPA.save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

The folder format (config.json, model.safetensors, the model card) and the Hugging Face Hub
calls belong to the weights layer (unipred.weights.pretrained), above this one. That module
fills ``WEIGHTS_IO`` when it is imported, and ``import unipred`` always imports it, so the
model offers the methods without the model layer importing upward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# "save" (model, folder, **card) -> Path; "load" (src, *, cls, map_location, **hub) -> model;
# "push" (model, repo_id, **kwargs) -> the Hub's commit info
WEIGHTS_IO: dict[str, Callable] = {}


def _io(name: str) -> Callable:
    if name not in WEIGHTS_IO:
        raise RuntimeError(f"no {name!r} handler for model folders: import unipred first")
    return WEIGHTS_IO[name]


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for NEPA models."""

    def save_pretrained(self, folder, **card) -> Path:
        """Write the model folder; ``training_config``, ``recipe``, ``evaluation`` (the
        ``evaluate-suite`` results dict) and ``weights`` ("raw" | "ema") go into the card."""
        return _io("save")(self, folder, **card)

    @classmethod
    def from_pretrained(cls, src, *, revision=None, cache_dir=None, local_files_only=False,
                        token=None, map_location="cpu"):  # fmt: skip
        """A folder, a Hub repo id (Hub cache honoured; HF_HUB_OFFLINE=1 works from the
        cache) or an official NEPA folder -> the model, in eval mode."""
        return _io("load")(
            src, cls=cls, map_location=map_location, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, token=token,
        )  # fmt: skip

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None,
                    commit_message: str = "Upload unipred model", revision=None, **card):  # fmt: skip
        """Save into a temporary folder and upload it to ``repo_id`` (created if needed)."""
        return _io("push")(
            self, repo_id, private=private, token=token, commit_message=commit_message,
            revision=revision, **card,
        )  # fmt: skip
