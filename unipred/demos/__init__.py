"""Self-contained demos on data generated or shipped locally: `unipred demo image|audio|video`."""

import os


def set_threads(n: int = 0) -> str:
    """Set torch's intra-op threads: ``n``, or with 0 the cores other processes leave idle
    (at least 1). Why: with more runnable threads than cores every parallel region waits for a
    descheduled thread; at load 11 on 2 cores a demo training step took 38.8 s with 2 threads
    and 4.4 s with 1 (on an idle machine 2 threads are ~1.6x faster than 1).
    Returns a line for the logs."""
    import torch

    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    if n <= 0:
        n = max(1, min(cores, round(cores - load)))
    torch.set_num_threads(n)
    return f"{n} torch thread(s) ({cores} cores, load average {load:.1f})"


def results_table(header: tuple[str, ...], rows, footer: str) -> str:
    """Markdown table of (name, n_train, n_test, scratch_acc, nepa_acc) rows plus a footer line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {t} | {a} | {b} | {s:.1%} | {n:.1%} |" for t, a, b, s, n in rows]
    return "\n".join(lines + ["", footer])
