"""Results: one line per row for the log, results.md / results.json in the run folder, and the
demos' comparison tables."""

from __future__ import annotations

import json
from pathlib import Path

from unipred.protocols.settings import RANDOM, ProtocolError


# ------------------------------------------------------------------------------ results
def _pct(v) -> str:
    """A fraction as a percentage; "-" where the row has none (a baseline's top-5)."""
    return "-" if v is None else f"{100 * v:.2f} %"


def format_row(r: dict) -> str:
    extra = ""
    if r["protocol"] == "layers":
        extra = f"  best: {r['best_layer']}"
    elif r["protocol"] == "knn":
        extra = f"  k={r['k']} T={r['temperature']}"
    elif "lr_cv" in r:
        extra = f"  lr {r['lr']} ({r['folds']}-fold CV on the training labels)"
    return (f"{r['protocol']:<10} {r['weights']:<10} top-1 {_pct(r['top1']):>8}  "
            f"top-5 {_pct(r['top5']):>8}  ({r['seconds']:.1f} s){extra}")  # fmt: skip


def rows_table(rows: list[dict], seconds: bool = False) -> list[str]:
    """The markdown table of protocol rows (header included), as the reports and the model
    card print it; ``seconds`` adds each row's wall time."""
    extra = (" seconds |", "---|") if seconds else ("", "")
    lines = [f"| protocol | weights | top-1 | top-5 | details |{extra[0]}",
             f"|---|---|---|---|---|{extra[1]}"]  # fmt: skip
    for r in rows:
        t = f" {r['seconds']:.1f} |" if seconds else ""
        lines.append(f"| {r['protocol']} | {r['weights']} | {_pct(r['top1'])} | "
                     f"{_pct(r['top5'])} | {row_details(r)} |{t}")  # fmt: skip
    return lines


def row_details(r: dict) -> str:
    """The "details" cell of a results row."""
    if r["protocol"] == "knn":
        return f"k={r['k']}, T={r['temperature']}"
    if r["protocol"] == "layers":
        return f"best: {r['best_layer']}"
    if r["protocol"] in ("linear", "attentive"):
        dim = f", {r['dim']} raw values" if "dim" in r else ""
        cv = f" ({r['folds']}-fold CV of {len(r['lr_cv'])})" if "lr_cv" in r else ""
        return f"{r['epochs']} epochs, lr {r['lr']}{cv}{dim}"
    return r.get("run_dir", "")


def results_markdown(results: dict) -> str:
    m = results.get("meta", {})
    lines = [
        f"# Evaluation of `{m.get('checkpoint', '?')}`",
        "",
        f"Config `{m.get('config', '?')}` (task `{m.get('task', '?')}`); "
        f"{m.get('train_samples', '?')} training / {m.get('val_samples', '?')} validation "
        "samples; frozen backbone in eval mode.",
        "",
        *rows_table(results["rows"], seconds=True),
    ]
    for r in results["rows"]:
        if r["protocol"] == "layers":
            lines += ["", f"Per-layer probe ({r['weights']} weights):", "",
                      "| layer | top-1 |", "|---|---|"]  # fmt: skip
            for layer, acc in r["per_layer"].items():
                star = " (best)" if layer == r["best_layer"] else ""
                lines.append(f"| {layer}{star} | {100 * acc['top1']:.2f} % |")
    return "\n".join(lines) + "\n"


def suite_folder(ckpt: str, out: str = "") -> Path:
    """Where ``evaluate-suite`` writes: ``out``, else ``<run folder of the checkpoint>/eval``."""
    if out:
        return Path(out)
    if ckpt == RANDOM:
        raise ProtocolError("ckpt=random has no run folder: give out=DIR for the results")
    p = Path(ckpt)
    if p.is_dir():
        return p / "eval"
    run = p.parent.parent if p.parent.name in ("checkpoints", "best") else p.parent
    return run / "eval"


# The JSON files hold accuracies in percent, as every printed line and table shows them, with
# the unit in the key (top1_pct) and in "units". In memory (run_suite, frozen_eval) a row keeps
# top1 / top5 as fractions; read_results turns a file, of this format or the earlier one
# (fractions under "top1" / "top5"), back into such rows.
UNITS = {"top1_pct": "%", "top5_pct": "%"}
_ACC = ("top1", "top5")


def _pct_value(v):
    ok = isinstance(v, (int, float)) and v == v  # None and NaN stay None
    return round(100 * v, 4) if ok else None


def _to_pct(entry: dict) -> dict:
    """A row (or a per-layer entry) with top1 / top5 fractions -> top1_pct / top5_pct."""
    out = {}
    for k, v in entry.items():
        if k in _ACC:
            out[f"{k}_pct"] = _pct_value(v)
        elif k == "per_layer" and isinstance(v, dict):
            out[k] = {layer: _to_pct(acc) for layer, acc in v.items()}
        else:
            out[k] = v
    return out


def with_percent(results: dict) -> dict:
    """``results`` as the JSON files hold it: every accuracy in percent (``top1_pct``,
    ``top5_pct``, per-layer entries too), the units named in ``units``."""
    rows = [_to_pct(r) for r in results.get("rows", [])]
    return {**results, "rows": rows, "units": UNITS}


def percent_tree(obj):
    """Every float in a nested dict / list of accuracies (fractions) as a percentage, rounded
    to 1e-4 points: what the demos write to their ``results.json`` as ``accuracy_pct``."""
    if isinstance(obj, dict):
        return {k: percent_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [percent_tree(v) for v in obj]
    if isinstance(obj, float):
        return round(obj * 100, 4)
    return obj


def _from_pct(entry: dict) -> dict:
    out = dict(entry)
    for k in _ACC:
        if f"{k}_pct" in out:
            v = out[f"{k}_pct"]
            out[k] = None if v is None else v / 100
    if isinstance(out.get("per_layer"), dict):
        out["per_layer"] = {layer: _from_pct(a) for layer, a in out["per_layer"].items()}
    return out


def read_results(data: dict | str | Path) -> dict:
    """An evaluate-suite ``results.json`` / ``eval/<protocol>.json`` (its dict or path) with
    every row's top1 / top5 as fractions, as the in-memory rows have them: files in percent
    (this format) and files of earlier releases (fractions) alike."""
    if not isinstance(data, dict):
        data = json.loads(Path(data).read_text())
    return {**data, "rows": [_from_pct(r) for r in data.get("rows", [])]}


def _write_json(data: dict, path: Path) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_results(results: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "results.md", folder / "results.json"
    md.write_text(results_markdown(results))
    _write_json(with_percent(results), js)
    return md, js


def write_protocol_result(results: dict, folder: Path, protocol: str) -> Path:
    """``unipred eval ... protocol=NAME``'s rows (and its baselines') as
    ``folder/NAME.json`` (``folder``: the checkpoint's run folder's eval/)."""
    path = Path(folder) / f"{protocol}.json"
    _write_json(with_percent(results) if "rows" in results else results, path)
    return path


# ------------------------------------------------------------------------ demo tables
LABELS = {"knn": "kNN (k=20, T=0.07)", "linear": "linear probe", "attentive": "attentive probe",
          "layers": "per-layer probe, best layer"}  # fmt: skip


def comparison_markdown(columns: dict[str, list[dict]]) -> str:
    """One row per protocol, one column per backbone (e.g. NEPA vs random init): top-1, with
    the best layer named for the per-layer sweep; "—" where a column has no such row (the
    raw input: k-NN and linear only). The rows: every column's protocols, first seen first."""
    names = list(columns)
    protos = list(dict.fromkeys(r["protocol"] for n in names for r in columns[n]))
    lines = ["| protocol | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in protos:
        cells = []
        for n in names:
            r = next((r for r in columns[n] if r["protocol"] == p), None)
            if r is None:  # e.g. the raw input has no attentive or per-layer row
                cells.append("—")
                continue
            best = f" ({r['best_layer']})" if p == "layers" else ""
            cells.append(f"{100 * r['top1']:.1f} %{best}")
        lines.append(f"| {LABELS.get(p, p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
