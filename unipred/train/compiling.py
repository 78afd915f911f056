"""``trainer.compile``: whether, and how, a run compiles the model with ``torch.compile``.

``auto`` (the default) compiles on CPU where it was measured faster over a run, and nowhere
else: the predictor's blocks one by one ("regional" compilation) when the predictor is at least
``AUTO_MIN_WIDTH`` wide and the run is long enough to pay the compilation back. All blocks
share one code object, so inductor compiles one block (forward and backward) once and every
block reuses it (one block's graphs to compile, not twelve; tests/test_compiling.py). Measured on
the project's shared 2-core CPU under load (benchmarks/README.md, "trainer.compile=auto"),
ViT-B/14's training step at batch 8 ran 1.32x (bf16) and 1.11x (fp32) faster than eager with its
blocks compiled, medians of 5 alternating rounds; on the idle machine 1.08x (bf16) and 0.99x
(fp32, no gain, so ``auto`` compiles bf16 runs only): inductor fuses the element-wise work (casts,
layer norms, GELU, residuals) that is a third of the eager bf16 step. The demo-sized models
(width 128) gained 1.19x a step but paid more in compilation than their few-minute runs save,
and tests run a few steps: they stay eager. GPUs keep what they had: ``auto`` leaves them eager, ``true`` compiles the
whole model.

Compilations are cached between runs by inductor's FX graph cache and the AOTAutograd cache
(both on by default in torch >= 2.7); ``describe`` says whether they are on and where.
"""

from __future__ import annotations

from torch import nn

# what trainer.compile accepts (case-insensitive; YAML booleans arrive as "True"/"False")
CHOICES = ("auto", "true", "false", "blocks", "whole")
AUTO_MIN_WIDTH = 512  # predictor width from which auto compiles on CPU (ViT-S is 384)
AUTO_MIN_STEPS = 100  # shorter runs stay eager: a cold compile costs ~a minute on 2 cores


def normalise(setting) -> str:
    """``setting`` as one of CHOICES; ValueError naming the choices otherwise."""
    s = str(setting).strip().lower()
    s = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false"}.get(s, s)
    s = {"off": "false", "none": "false"}.get(s, s)
    if s not in CHOICES:
        raise ValueError(f"trainer.compile must be one of {', '.join(CHOICES)}, got {setting!r}")
    return s


def choose(
    setting,
    device_type: str,
    model: nn.Module,
    steps: int | None,
    training: bool = True,
    precision: str | None = None,
) -> tuple[str, str]:
    """(mode, why): mode is ``off``, ``blocks`` (each predictor block compiled) or ``whole``.

    ``steps``: the run's optimizer steps when known (None or <= 0: unknown, taken as long).
    ``training`` False (evaluation): ``auto`` stays eager (only training steps were measured).
    ``precision``: the run's trainer.precision; ``auto`` compiles bf16 runs only (fp32 measured
    no faster compiled on the idle machine); None = not known (taken as bf16)."""
    s = normalise(setting)
    if s == "false":
        return "off", "trainer.compile=false"
    if s in ("true", "whole"):
        return "whole", f"trainer.compile={s}"
    blocks = _blocks(model)
    if s == "blocks":
        if blocks is None:
            return "whole", "trainer.compile=blocks, but the model has no predictor blocks"
        return "blocks", "trainer.compile=blocks"
    if not training:
        return "off", "trainer.compile=auto compiles training runs only"
    if device_type != "cpu":
        return "off", f"trainer.compile=auto on {device_type} (trainer.compile=true compiles)"
    if blocks is None:
        return "off", "trainer.compile=auto: the model has no predictor blocks"
    width = model.predictor.cfg.dim
    if width < AUTO_MIN_WIDTH:
        return "off", (
            f"trainer.compile=auto: predictor width {width} < {AUTO_MIN_WIDTH}, where "
            "compiling on CPU costs more than it saves"
        )
    if precision is not None and not str(precision).startswith("bf16"):
        return "off", (
            f"trainer.compile=auto: precision {precision} on CPU, where compiling measured no "
            "faster (bf16-mixed runs compile)"
        )
    if steps is not None and 0 < steps < AUTO_MIN_STEPS:
        return "off", f"trainer.compile=auto: {steps} steps < {AUTO_MIN_STEPS}, too few to pay it"
    return "blocks", f"trainer.compile=auto: CPU, bf16, predictor width {width}"


def apply(model: nn.Module, mode: str, **options) -> None:
    """Compile ``model`` in place (state-dict keys unchanged) as ``choose`` decided;
    ``options`` go to ``torch.compile`` (tests pass a lighter backend)."""
    if mode == "whole":
        model.compile(**options)
    elif mode == "blocks":
        for block in _blocks(model):
            block.compile(**options)
    elif mode != "off":
        raise ValueError(f"unknown compile mode {mode!r}")


def describe(mode: str, why: str, model: nn.Module) -> str:
    """One line saying what was chosen, and whether compilations are cached between runs."""
    if mode == "off":
        return f"eager (not compiled): {why}"
    what = "the whole model" if mode == "whole" else f"each of the {len(_blocks(model))} blocks"
    return f"torch.compile {what} ({why}); {cache_state()}"


def cache_state() -> str:
    """Whether inductor's FX graph cache and the AOTAutograd cache are on, and where."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    fx = bool(getattr(inductor_config, "fx_graph_cache", False))
    aot = bool(getattr(functorch_config, "enable_autograd_cache", False))
    if not (fx or aot):
        return "compilations NOT cached (TORCHINDUCTOR_FX_GRAPH_CACHE=0?): each run recompiles"
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    parts = [n for n, on in (("FX graph", fx), ("AOTAutograd", aot)) if on]
    return f"{' and '.join(parts)} caches on in {cache_dir()}"


def _blocks(model: nn.Module):
    """The predictor's blocks (an nn.ModuleList), or None for a model without them."""
    blocks = getattr(getattr(model, "predictor", None), "blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


__all__ = ["AUTO_MIN_STEPS", "AUTO_MIN_WIDTH", "CHOICES", "apply", "choose", "describe"]
