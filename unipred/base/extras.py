"""Optional dependencies, imported only when the modality that needs them is used.

The core and the image path never import torchaudio, torchcodec, matplotlib or scikit-video.
A modality calls :func:`require` when it is actually used; a missing or broken library then
fails with one line that names the extra to install, not a traceback from deep inside it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is missing or broken; the message names the extra to install."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming ``pip install 'unipred[extra]'``.

    Any failure counts, not only a missing package: a torchaudio built for another torch
    imports but fails to load its library (OSError / undefined symbol).
    """
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, OSError, RuntimeError all mean "broken"
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingExtra(
            f"{purpose} needs {module}, which could not be imported ({why}); "
            f"install it with: pip install 'unipred[{extra}]'"
        ) from None
