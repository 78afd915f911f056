"""Running the protocols on a config's task: one feature pass per weight set for the frozen
protocols, the fine-tune protocol through the engine, and ``evaluate-suite``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unipred.protocols.attentive import run_attentive
from unipred.protocols.features import (
    Features,
    extract_features,
    load_backbone_weights,
    pool_words,
    weight_sets,
)
from unipred.protocols.knn import _scores, run_knn, topk_accuracy
from unipred.protocols.layers import run_layers
from unipred.protocols.linear import LinearProbe, _cosine, predict, run_linear
from unipred.protocols.report import format_row, suite_folder, write_results
from unipred.protocols.settings import (
    FROZEN,
    RANDOM,
    EvalSettings,
    FeatureSettings,
    ProtocolError,
    parse_eval_settings,
)


# ------------------------------------------------------------------------ orchestration
def _device(cfg) -> torch.device:
    acc = cfg.trainer.accelerator
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ProtocolError("trainer.accelerator=gpu but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast(cfg) -> torch.dtype | None:
    from unipred.train.machine import cpu_precision

    p = cpu_precision(cfg.trainer)[0].precision  # no bf16 on a CPU without fast bf16 kernels
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(p)


def _loader(task, split: str, s: FeatureSettings, workers: int, augment: bool = False):
    if augment:
        ds, collate = task.build_dataset(split), task.collate_fn(split)
    else:
        ds, collate = task.feature_dataset(split)
    if ds is None:
        key = "data.root" if split == "train" else "data.val_root (or the task's val split)"
        raise ProtocolError(
            f"task {task.cfg.task!r} has no {split} split here: set {key}; the frozen "
            "protocols need labelled train and val data"
        )
    nw = workers if s.num_workers < 0 else s.num_workers
    return torch.utils.data.DataLoader(
        ds, batch_size=s.batch, shuffle=False, num_workers=nw, collate_fn=collate
    )


def _num_classes(task, *labels: torch.Tensor) -> int:
    n = task.num_classes() if hasattr(task, "num_classes") else 0
    seen = int(max(int(y.max()) for y in labels)) + 1
    if n and seen > n:
        raise ProtocolError(f"labels go up to {seen - 1} but the task has {n} classes")
    return n or seen


def apply_threads(cfg, log=print) -> None:
    """``trainer.threads`` for the frozen protocols (feature pass, probes), as ``unipred fit``
    applies it (unipred/base/threads.py): left to torch's default of one thread per core, a
    probe's small ops crawl while other jobs hold the cores (the cross-validated linear probe
    of ``small/probe``: 47-59 s with 2 threads vs 5.4 s with 1, load average 4.5 on 2 cores)."""
    from unipred.base.threads import threads_for_run

    t = cfg.trainer
    n = torch.get_num_threads()
    line = threads_for_run(t.threads, t.accelerator, 1)
    if line and (n != torch.get_num_threads() or not _THREADS_SAID):
        log(f"[unipred] {line}")
        _THREADS_SAID.append(line)


_THREADS_SAID: list[str] = []  # said once per process, then only when it changes


def run_protocols(cfg, settings: EvalSettings, protocols, log=print) -> dict:
    """Run frozen protocols on ``cfg.ckpt`` for the requested weight sets.

    -> {"rows": [{protocol, weights, top1, top5, seconds, ...}], "meta": {...}}.
    The backbone is the CONFIG's model (``task.build_model()``: its attention mode, e.g.
    causal as pretrained, is the config's), with every backbone tensor from the checkpoint."""
    from unipred.base.registry import TASKS

    protocols = list(protocols)
    apply_threads(cfg, log)
    bad = [p for p in protocols if p not in FROZEN]
    if bad:
        raise ProtocolError(f"not a frozen-feature protocol: {bad}; use {', '.join(FROZEN)}")
    if not cfg.ckpt:
        raise ProtocolError("give ckpt=PATH (a checkpoint or a save_pretrained folder)")
    need_classification(cfg, f"protocol={protocols[0]}" if len(protocols) == 1 else "the protocols")
    task = TASKS.get(cfg.task)(cfg)
    torch.manual_seed(cfg.seed)  # the random-init baseline is the same model every time
    model = task.build_model()
    device, autocast = _device(cfg), _autocast(cfg)
    fs = settings.features
    concat = concat_blocks(fs, model)
    workers = int(getattr(cfg.data, "num_workers", 0))
    rows, meta = [], {"feature_seconds": {}}
    want_layers, want_tokens = "layers" in protocols, "attentive" in protocols
    for name, sd in weight_sets(cfg.ckpt, settings.ema):
        if sd is not None:
            load_backbone_weights(model, sd, cfg.ckpt)
        model.to(device)
        t0 = time.perf_counter()
        feats = {}
        for split, limit in (("train", fs.max_train), ("val", fs.max_val)):
            feats[split] = extract_features(
                model, _loader(task, split, fs, workers), inputs=task.inputs, pool=fs.pool,
                layers=want_layers, tokens=want_tokens, device=device, autocast=autocast,
                max_samples=limit, block=fs.block, cells=fs.grid, concat=concat,
                norm=fs.norm,
            )  # fmt: skip
        meta["feature_seconds"][name] = round(time.perf_counter() - t0, 2)
        tr, va = feats["train"], feats["val"]
        meta.update(train_samples=len(tr.labels), val_samples=len(va.labels))
        C = _num_classes(task, tr.labels, va.labels)
        where = "final norm" if fs.block is None else f"block {fs.block}"
        where += f" + blocks {list(concat)}" if concat else ""
        how = pool_words(fs.pool, fs.grid)
        how += f", tokens standardised per {fs.norm}" if fs.norm != "none" else ""
        log(f"[{name}] features ({where}, {how} pooling): {len(tr.labels)} train / "
            f"{len(va.labels)} val samples, width {tr.pooled.shape[1]}, "
            f"{meta['feature_seconds'][name]} s")  # fmt: skip
        for proto in protocols:
            t0 = time.perf_counter()
            if proto == "knn":
                r = run_knn(tr, va, C, settings.knn)
            elif proto == "linear" and settings.linear.augment:
                r = run_linear_augmented(model, task, va, C, settings, device, autocast)
            elif proto == "linear":
                r = run_linear(tr, va, C, settings.linear, settings.seed, device)
            elif proto == "attentive":
                heads = model.predictor.cfg.heads if hasattr(model, "predictor") else 8
                r = run_attentive(tr, va, C, settings.attentive, heads, settings.seed, device)
            else:
                r = run_layers(tr, va, C, settings.layers, settings.seed, device)
            r = {"protocol": proto, "weights": name, **r,
                 "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
            rows.append(r)
            log(format_row(r))
            if proto == "layers":
                for layer, acc in r["per_layer"].items():
                    mark = "  <- best" if layer == r["best_layer"] else ""
                    log(f"    {layer:<12} top-1 {100 * acc['top1']:6.2f} %{mark}")
        del feats, tr, va
    return {"rows": rows, "meta": meta}


def concat_blocks(fs, model) -> tuple[int, ...]:
    """The blocks whose pooled outputs are appended to the read-out: ``features.concat``,
    then, with ``features.concat_below``, every block below the top one, each once."""
    n = len(model.predictor.blocks)
    below = range(n - 1) if fs.concat_below else ()
    # -1 and n-1 are one block; one the model lacks is left as written for the clear error
    return tuple(dict.fromkeys([b % n if -n <= b < n else b for b in fs.concat] + [*below]))


def run_linear_augmented(model, task, val: Features, C, settings: EvalSettings, device,
                         autocast) -> dict:  # fmt: skip
    """Linear probe on features recomputed every epoch through the task's training pipeline
    (its augmentation), backbone frozen in eval mode."""
    s, fs = settings.linear, settings.features
    torch.manual_seed(settings.seed)
    probe = LinearProbe(val.pooled.shape[1], C).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loader = _loader(task, "train", dataclasses.replace(fs, batch=s.batch),
                     int(getattr(task.cfg.data, "num_workers", 0)), augment=True)  # fmt: skip
    total = s.epochs * max(1, len(loader)) if hasattr(loader, "__len__") else s.epochs
    step = 0
    for _ in range(s.epochs):
        f = extract_features(model, loader, inputs=task.inputs, pool=fs.pool, device=device,
                             autocast=autocast, block=fs.block, cells=fs.grid,
                             concat=concat_blocks(fs, model), norm=fs.norm)  # fmt: skip
        probe.train()
        for i in range(0, len(f.labels), s.batch):
            x, y = f.pooled[i : i + s.batch].to(device), f.labels[i : i + s.batch].to(device)
            if len(y) < 2:
                continue
            for gr in opt.param_groups:
                gr["lr"] = s.lr * _cosine(step, total)
            loss = F.cross_entropy(probe(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    scores = predict(probe, (val.pooled,), device=device)
    return _scores(topk_accuracy(scores, val.labels), topk_accuracy(scores, val.labels, 5),
                   epochs=s.epochs, lr=s.lr, augment=True)  # fmt: skip


def need_classification(cfg, what: str) -> None:
    """The protocols score class labels: a task of another objective is one clear error."""
    from unipred.base.registry import TASKS
    from unipred.task import ClassifyTask

    if not issubclass(TASKS.get(cfg.task), ClassifyTask):
        raise ProtocolError(
            f"{what} scores class labels, but task {cfg.task!r} is not a classification task; "
            "give a *_classify task (a segmentation model is scored by plain `unipred eval`)"
        )


def run_finetune(cfg, settings: EvalSettings, log=print) -> dict:
    """Fine-tune with the CONFIG's recipe from the checkpoint's backbone (raw and/or EMA);
    report the final validation accuracy of each run."""
    from unipred.train.engine import fit

    need_classification(cfg, "protocol=finetune")
    if not cfg.ckpt:
        raise ProtocolError("protocol=finetune needs ckpt=PATH (a pretraining checkpoint)")
    names = [n for n, _ in weight_sets(cfg.ckpt, settings.ema)]
    rows = []
    for name in names:
        run = dataclasses.replace(cfg)
        init = "" if name == RANDOM else f"pretrain:{cfg.ckpt}" + (":ema" if name == "ema" else "")
        run.model = dataclasses.replace(cfg.model, init=init)  # random: from scratch
        run.run_dir = str(Path(cfg.run_dir) / f"finetune_{name}")
        run.ckpt = ""
        t0 = time.perf_counter()
        trainer = fit(run)
        if "val/acc1" not in trainer.callback_metrics:  # stopped by max_steps before validating
            trainer.validate(trainer.lightning_module, verbose=False)
        m = trainer.callback_metrics
        r = {"protocol": "finetune", "weights": name,
             "top1": float(m.get("val/acc1", float("nan"))),
             "top5": float(m.get("val/acc5", float("nan"))),
             "run_dir": run.run_dir, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        rows.append(r)
        log(format_row(r))
    return {"rows": rows, "meta": {}}


def evaluate_suite(cfg, settings: EvalSettings, config_name: str = "", log=print) -> dict:
    """Every requested protocol on ``cfg.ckpt``; results.md / results.json in the run folder."""
    from unipred.protocols.baselines import run_with_baselines

    t0 = time.perf_counter()
    results = run_with_baselines(cfg, settings, settings.protocols, log)
    results["meta"].update(
        checkpoint=str(cfg.ckpt), config=config_name, task=cfg.task,
        settings=dataclasses.asdict(settings), total_seconds=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    md, js = write_results(results, suite_folder(cfg.ckpt, settings.out))
    log(f"wrote {md} and {js}")
    return results


def frozen_eval(config, overrides: list[str], ckpt: str, protocols=FROZEN, settings=(),
                log=print, recipe_defaults: bool = False) -> list[dict]:  # fmt: skip
    """The frozen protocols on one checkpoint (or ``"random"``) of ``config`` with ``overrides``:
    the rows of the demos' tables (raw weights only). ``settings`` are eval keys such as
    ``"linear.epochs=50"``; with ``recipe_defaults`` the config's ``eval_defaults`` (its
    read-out, e.g. ``features.pool=grid``) come first, as ``unipred eval`` reads them."""
    from unipred.train.config import load_config

    cfg = load_config(config, [*overrides, f"ckpt={ckpt}"])
    return run_protocols(cfg, demo_settings(cfg, settings, recipe_defaults), protocols, log)["rows"]


def demo_settings(cfg, settings=(), recipe_defaults: bool = False) -> EvalSettings:
    """The eval settings of a demo's frozen rows: raw weights only, ``settings`` over the
    config's ``eval_defaults`` when ``recipe_defaults``."""
    from unipred.protocols.settings import recipe_eval_args

    defaults = recipe_eval_args(cfg.eval_defaults) if recipe_defaults else []
    return parse_eval_settings([*defaults, *settings, "ema=false"])


def readout_text(s: EvalSettings) -> str:
    """How the pooled protocols read the tokens, in words (for tables and logs)."""
    how = pool_words(s.features.pool, s.features.grid)
    how += f", tokens standardised per {s.features.norm}" if s.features.norm != "none" else ""
    where = "final norm" if s.features.block is None else f"block {s.features.block}"
    where += f" + blocks {list(s.features.concat)}" if s.features.concat else ""
    return f"{how} of the {where}"


def frozen_columns(config, overrides: list[str], ckpt: str, protocols=FROZEN, settings=(),
                   run_dirs=None, log=print) -> tuple[dict[str, list[dict]], str]:  # fmt: skip
    """The demos' frozen table, through the config's own read-out (its ``eval_defaults``):
    ({"NEPA": rows of ``ckpt``, "random init": rows, "raw input": k-NN and linear on the raw
    patches read out alike, "raw input, flattened": ...}, the read-out in words). ``run_dirs``
    maps a column to its run folder (``run_dir=`` override)."""
    from unipred.protocols.baselines import raw_eval
    from unipred.train.config import load_config

    run_dirs = run_dirs or {}

    def ov(col):
        return [*overrides, *([f"run_dir={run_dirs[col]}"] if col in run_dirs else [])]

    def say(col):
        return lambda line: log(f"{col}: {line}")

    cols = {col: frozen_eval(config, ov(col), c, protocols, settings, say(col), True)
            for col, c in (("NEPA", ckpt), ("random init", RANDOM))}  # fmt: skip
    raw = raw_eval(config, ov("raw input"), settings, say("raw input"), recipe_defaults=True)
    cols["raw input"] = [r for r in raw if r["weights"] == "input"]
    cols["raw input, flattened"] = [r for r in raw if r["weights"] == "input_flat"]
    cfg = load_config(config, overrides)
    return cols, readout_text(demo_settings(cfg, settings, recipe_defaults=True))
