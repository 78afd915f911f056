"""unipred's own warnings: ``[unipred] warning: ...`` on one line, with no file attached.

``warnings.warn(msg, stacklevel=2)`` from a callback names the frame that called it, which in
a training run is Lightning's (``.../lightning/pytorch/trainer/call.py:228: step 50: ...``):
the reader is sent to a file that has nothing to do with the message. Warnings raised through
:func:`warn` carry the category :class:`UnipredWarning` (so they can still be filtered like any
warning: ``-W ignore::unipred.warn.UnipredWarning``) and are printed without a location.
"""

from __future__ import annotations

import warnings


class UnipredWarning(UserWarning):
    """A warning about the user's run, data or config, raised by unipred itself."""


_plain_format = None


def _format(message, category, filename, lineno, line=None):
    if isinstance(category, type) and issubclass(category, UnipredWarning):
        return f"[unipred] warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


def install() -> None:
    """Print UnipredWarnings without a location (other warnings keep their format)."""
    global _plain_format
    if _plain_format is None:
        _plain_format = warnings.formatwarning
        warnings.formatwarning = _format


def warn(message: str) -> None:
    """Warn the user about their run in one line that names no file."""
    install()
    warnings.warn(message, UnipredWarning, stacklevel=2)
