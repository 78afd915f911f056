"""Text classification sets built on this machine from Debian packages, and generated text.

* ``wordlang`` (the text recipe's tuning set): language identification of single words, from
  Debian's spelling word lists (``apt-get install wamerican wngerman wfrench wspanish witalian
  wportuguese wdutch wswedish``; files under /usr/share/dict). Words present in more than one
  list, and possessives (``'s``), are dropped; each language's remaining words are shuffled with
  the seed and the first ``train`` / ``test`` of them taken (disjoint). 8 classes.
* ``manlang`` (the held-out set): language identification of text lines from the translated
  manual pages of Debian's manpages-l10n (``apt-get install manpages-de manpages-fr manpages-es
  manpages-it manpages-pl manpages-nl manpages-pt-br``; files listed by ``dpkg -L``). The roff
  markup is stripped; lines of at least 40 characters and 5 words are kept. A *page* is in the
  test split when crc32 of its name is divisible by 5, so no page gives lines to both splits.
  7 classes.
* ``generated_records``: stand-in "languages" (one random letter-bigram chain per class) for
  runs without data (``data.root`` empty): smoke tests and the demo's fallback.

Each builder writes ``OUT/{train,test}/<class>/text.txt`` (one record a line), the layout the
``text`` data source reads, plus ``manifest.json``; a finished folder is found again by its
manifest and not rebuilt.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import zlib
from pathlib import Path

WORDLISTS = {  # class -> (Debian package, file under /usr/share/dict)
    "en": ("wamerican", "american-english"),
    "de": ("wngerman", "ngerman"),
    "fr": ("wfrench", "french"),
    "es": ("wspanish", "spanish"),
    "it": ("witalian", "italian"),
    "pt": ("wportuguese", "portuguese"),
    "nl": ("wdutch", "dutch"),
    "sv": ("wswedish", "swedish"),
}
MANPAGES = {"de": "manpages-de", "fr": "manpages-fr", "es": "manpages-es", "it": "manpages-it",
            "pl": "manpages-pl", "nl": "manpages-nl", "pt": "manpages-pt-br"}  # fmt: skip
_VERSION = 1  # bump when a recipe below changes, so built folders are rebuilt
DICT = Path("/usr/share/dict")


def _install_hint(packages) -> str:
    return "apt-get install -y " + " ".join(packages)


def _finished(out: Path, spec: dict) -> bool:
    m = out / "manifest.json"
    return m.is_file() and json.loads(m.read_text()).get("spec") == spec


def _write(out: Path, spec: dict, splits: dict[str, dict[str, list[str]]]) -> Path:
    for split, classes in splits.items():
        for name, lines in classes.items():
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts = {s: {c: len(v) for c, v in cl.items()} for s, cl in splits.items()}
    (out / "manifest.json").write_text(json.dumps({"spec": spec, "counts": counts}, indent=1))
    return out


def build_wordlang(out, train: int = 2000, test: int = 500, seed: int = 0) -> Path:
    """Build (or find) the word-list language set in ``out``; returns ``out``."""
    out = Path(out)
    spec = {"set": "wordlang", "version": _VERSION, "train": train, "test": test, "seed": seed}
    if _finished(out, spec):
        return out
    missing = [pkg for pkg, f in WORDLISTS.values() if not (DICT / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the word lists are not installed: {_install_hint(missing)}")
    words = {}
    for lang, (_, fname) in WORDLISTS.items():
        text = (DICT / fname).read_text(encoding="utf-8", errors="replace")
        words[lang] = {w.strip() for w in text.splitlines() if w.strip() and "'" not in w}
    seen: dict[str, int] = {}
    for ws in words.values():
        for w in ws:
            seen[w] = seen.get(w, 0) + 1
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for lang, ws in words.items():
        unique = sorted(w for w in ws if seen[w] == 1)
        random.Random(f"{seed}/{lang}").shuffle(unique)
        if len(unique) < train + test:
            raise ValueError(f"{lang}: only {len(unique)} words for {train} + {test}")
        splits["train"][lang], splits["test"][lang] = unique[:train], unique[train : train + test]
    return _write(out, spec, splits)


_ROFF_ESCAPES = re.compile(
    r"\\(f(\(..|\[[^]]*\]|.)|\(..|\*(\(..|\[[^]]*\]|.)|s[-+]?\d|[&,/:%|^~0e])"
)


def roff_text(line: str) -> str:
    """One roff source line -> its plain text ('' for requests, macros and comments)."""
    if not line or line[0] in ".'":
        return ""
    line = _ROFF_ESCAPES.sub(lambda m: "\\" if m.group(0) == "\\e" else "", line)
    line = line.replace("\\-", "-").replace("\\ ", " ").replace("\\\\", "\\")
    return " ".join(line.split())


def _package_pages(package: str) -> list[Path]:
    res = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if res.returncode != 0:
        return []
    return sorted(Path(p) for p in res.stdout.splitlines() if p.endswith(".gz") and "/man" in p)


def build_manlang(out, train: int = 2000, test: int = 500, seed: int = 0) -> Path:
    """Build (or find) the man-page language set in ``out``; returns ``out``."""
    out = Path(out)
    spec = {"set": "manlang", "version": _VERSION, "train": train, "test": test, "seed": seed}
    if _finished(out, spec):
        return out
    pages = {lang: _package_pages(pkg) for lang, pkg in MANPAGES.items()}
    missing = [MANPAGES[lang] for lang, p in pages.items() if not p]
    if missing:
        raise FileNotFoundError(f"the translated man pages are not installed: "
                                f"{_install_hint(missing)}")  # fmt: skip
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for lang, paths in pages.items():
        lines = {"train": [], "test": []}
        for p in paths:
            split = "test" if zlib.crc32(p.name.encode()) % 5 == 0 else "train"
            try:
                text = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            for raw in text.splitlines():
                t = roff_text(raw)
                if len(t) >= 40 and len(t.split()) >= 5 and "\ufffd" not in t:
                    lines[split].append(t)
        for split, n in (("train", train), ("test", test)):
            uniq = sorted(set(lines[split]))
            random.Random(f"{seed}/{lang}/{split}").shuffle(uniq)
            if len(uniq) < n:
                raise ValueError(f"{lang} {split}: only {len(uniq)} man-page lines for {n}")
            splits[split][lang] = uniq[:n]
    return _write(out, spec, splits)


SETS = {"wordlang": build_wordlang, "manlang": build_manlang}


# ------------------------------------------------------------------------ generated text
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _chain(seed: int) -> list[list[float]]:
    """A random letter-bigram transition table (27 states: letters + end of word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(27):
        w = [rng.random() ** 4 for _ in range(26)]  # peaked: each language prefers some pairs
        rows.append([v / sum(w) for v in w])
    return rows


def generated_records(n_classes: int, per_class: int, seed: int, split: str,
                      words: int = 4) -> list[tuple[bytes, int]]:  # fmt: skip
    """``per_class`` lines of ``words`` random words per class; class c's letters follow its own
    bigram chain (drawn from ``seed`` and c alone), so a line's class can be learnt from its
    letter pairs. The split only changes which lines are drawn."""
    out = []
    for c in range(n_classes):
        table = _chain(seed * 1009 + c)
        rng = random.Random(f"{seed}/{split}/{c}")
        for _ in range(per_class):
            ws = []
            for _ in range(words):
                prev, w = 26, []
                for _ in range(rng.randint(3, 8)):
                    prev = rng.choices(range(26), weights=table[prev])[0]
                    w.append(_LETTERS[prev])
                ws.append("".join(w))
            out.append((" ".join(ws).encode(), c))
    return out
