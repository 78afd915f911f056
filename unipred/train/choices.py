"""Keys whose value must be one of a known set (a registered name, an accelerator, a precision,
a logger), checked when a config is loaded: a wrong value is one line naming the key and the
choices, before anything is built, never a traceback from deep inside torch or Lightning."""

from __future__ import annotations

import difflib

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning's precision names (the short forms "32", "16", "bf16", "64" are its aliases)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
PRECISION_ALIASES = ("32", "16", "bf16", "64", "transformer-engine", "transformer-engine-float16")
LOGGERS = ("csv", "tensorboard", "wandb")
CPU_BF16 = ("auto", "keep")


def _refuse(key: str, value, choices) -> str:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}={value!r} is not one of the choices{hint}: {', '.join(choices)}"


def registered_problem(key: str, value, registry) -> str | None:
    """None when ``value`` is registered in ``registry``, else one line naming the key, the
    closest name, every choice, and the plugins that failed to load."""
    if value in registry:
        return None
    from unipred.base.registry import PLUGIN_ERRORS

    broken = "".join(f"; plugin {m} failed to load: {e}" for m, e in PLUGIN_ERRORS.items())
    return _refuse(key, value, registry.names()) + broken


def choice_problem(cfg) -> str | None:
    """The first key of ``cfg`` (a RunConfig) whose value is not one of its choices, as one
    line, or None. The task is checked earlier (its schema depends on it)."""
    from unipred.base.registry import DECODERS, MODELS, TOKENIZERS

    m, t = cfg.model, cfg.trainer
    checks = [
        lambda: registered_problem("model.name", m.name, MODELS),
        lambda: (
            m.tokenizer is not None
            and registered_problem("model.tokenizer", m.tokenizer, TOKENIZERS)
        ),
        lambda: (
            hasattr(cfg.data, "decoder")
            and registered_problem("data.decoder", cfg.data.decoder, DECODERS)
        ),
        lambda: (
            t.accelerator not in ACCELERATORS
            and _refuse("trainer.accelerator", t.accelerator, ACCELERATORS)
        ),
        lambda: (
            t.precision not in PRECISIONS + PRECISION_ALIASES
            and _refuse("trainer.precision", t.precision, PRECISIONS)
        ),
        lambda: _compile_problem(t.compile),
        lambda: t.cpu_bf16 not in CPU_BF16 and _refuse("trainer.cpu_bf16", t.cpu_bf16, CPU_BF16),
    ]
    checks += [
        (lambda name=name: name not in LOGGERS and _refuse("trainer.loggers", name, LOGGERS))
        for name in t.loggers
    ]
    for check in checks:
        problem = check()
        if problem:
            return problem
    return None


def device_problem(cfg) -> str | None:
    """A run asking for an accelerator this machine does not have, as one line, or None."""
    acc = cfg.trainer.accelerator
    if acc in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            return (
                f"trainer.accelerator={acc}: no GPU is visible here (torch.cuda.is_available() "
                "is False); use trainer.accelerator=cpu, or auto to take a GPU when there is one"
            )
    if acc == "mps":
        import torch

        if not torch.backends.mps.is_available():
            return "trainer.accelerator=mps: MPS is not available here; use cpu or auto"
    return None


def _compile_problem(setting) -> str | None:
    """trainer.compile outside unipred.train.compiling.CHOICES, as one line."""
    from unipred.train.compiling import normalise

    try:
        normalise(setting)
    except ValueError as e:
        return str(e)
    return None
