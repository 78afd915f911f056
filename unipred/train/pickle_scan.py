"""Which Python objects a checkpoint's pickle asks for, read from its opcodes (nothing is
unpickled, nothing runs).

Why not torch's error message: torch's weights-only loader raises the same
``UnpicklingError`` for a file carrying code and for a damaged one, and its wording changes
between releases (and advises ``weights_only=False``, which is exactly wrong for a planted
file). The opcodes are the pickle format itself: a ``GLOBAL``/``STACK_GLOBAL``/``INST`` names
the object the unpickler would import. A checkpoint is *unsafe* when it names one outside
torch's weights-only allow-list, *damaged* when it cannot be read and names none.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

# What torch's weights-only loader accepts without being told (its private allow-list is used
# when present; this is the floor when it is not): the tensor/storage rebuild functions and
# the containers torch.save writes.
_FLOOR = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Size",
    "torch.device",
    "builtins.set",
    "builtins.frozenset",
    "builtins.complex",
    "builtins.bytearray",
}


def allowed_globals(extra=()) -> set[str]:
    """``module.name`` of every object torch's weights-only loader takes by default, plus
    ``extra`` (objects or strings)."""
    out = set(_FLOOR)
    try:  # torch's own list (private, so guarded); storages and dtypes are in it
        from torch import _weights_only_unpickler as wou

        out |= set(wou._get_allowed_globals().keys())
        out |= set(wou._get_user_allowed_globals().keys())
    except (ImportError, AttributeError):
        pass
    for x in extra:
        out.add(x if isinstance(x, str) else f"{x.__module__}.{x.__qualname__}")
    return out


def _storage_like(name: str) -> bool:
    # torch.FloatStorage, torch.storage.UntypedStorage, dtypes: data, whatever the torch
    mod, _, leaf = name.rpartition(".")
    return mod in ("torch", "torch.storage") and (leaf.endswith("Storage") or leaf in _DTYPES)


_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
           "uint8", "bool", "complex64", "complex128"}  # fmt: skip


def globals_in_pickle(stream) -> tuple[list[str], bool]:
    """The objects (``module.name``) that one pickle in ``stream`` names, in order, and
    whether the pickle parsed to its STOP opcode. A ``STACK_GLOBAL`` whose operands are not
    two plain strings is reported as ``"?"`` (it could name anything)."""
    names: list[str] = []
    strings: list = []  # the values a STACK_GLOBAL would pop, as far as they are strings
    memo: dict = {}
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", ".", 1))
            elif op.name == "STACK_GLOBAL":
                if len(strings) >= 2 and all(isinstance(s, str) for s in strings[-2:]):
                    names.append(f"{strings[-2]}.{strings[-1]}")
                else:
                    names.append("?")
                strings.clear()
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                             "SHORT_BINSTRING", "BINSTRING", "STRING"):  # fmt: skip
                strings.append(arg)
            elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                key = len(memo) if op.name == "MEMOIZE" else arg
                memo[key] = strings[-1] if strings else None
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(arg))
            elif op.name == "STOP":
                return names, True
            else:
                strings.append(None)  # anything else on the stack breaks a string pair
    except Exception:  # noqa: BLE001 - a damaged stream ends the scan; what was seen counts
        return names, False
    return names, False


def pickled_globals(path: str | Path) -> tuple[list[str], bool]:
    """Every object the pickles of the checkpoint at ``path`` name, and whether they parsed.

    A zip checkpoint (torch's format since 1.6) is scanned in its ``data.pkl``; a legacy
    checkpoint (a run of pickles followed by raw storage bytes) in its first four pickles,
    which hold the magic number, protocol, system info and the object itself."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(f) as z:
                    pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
                    if not pkl:
                        return [], False
                    return globals_in_pickle(io.BytesIO(z.read(pkl[0])))
            except (zipfile.BadZipFile, OSError, EOFError, ValueError):
                return [], False
        names: list[str] = []
        for _ in range(4):
            got, ok = globals_in_pickle(f)
            names += got
            if not ok:
                return names, False
        return names, True


def unsafe_globals(path: str | Path, extra=()) -> list[str]:
    """The objects the checkpoint's pickle asks for that torch's weights-only loader would
    not build (so loading them could run code), in order of first appearance."""
    ok = allowed_globals(extra)
    names, parsed = pickled_globals(path)
    if not parsed:  # a damaged stream (random bytes too): only a real dotted name is evidence;
        # a STACK_GLOBAL of unknown operands or a "name" of stray bytes is noise, not code
        names = [n for n in names if n != "?" and all(x.isidentifier() for x in n.split("."))]
    out: list[str] = []
    for n in names:
        if n not in ok and not _storage_like(n) and n not in out:
            out.append(n)
    return out
