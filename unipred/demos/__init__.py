"""Self-contained demos on data generated or shipped locally: `unipred demo image|audio|video`."""

from unipred.threads import set_threads

__all__ = ["results_table", "set_threads"]


def results_table(header: tuple[str, ...], rows, footer: str) -> str:
    """Markdown table of (name, n_train, n_test, scratch_acc, nepa_acc) rows plus a footer line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {t} | {a} | {b} | {s:.1%} | {n:.1%} |" for t, a, b, s, n in rows]
    return "\n".join(lines + ["", footer])
