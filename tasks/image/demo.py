"""`unipred demo image`: NEPA on Fashion-MNIST, pretraining to fine-tuning and linear probing.

1. ``fmnist_pretrain`` (configs/demo/fmnist_pretrain.yaml): next-embedding pretraining of a
   small ViT (dim 128, depth 6, 16 patches of 7x7 px; 1,000 steps of 128, the small-data
   objective ``model.objective.auto`` picks) on the 60,000 training images, no labels; as 2
   data-parallel processes of one thread each (gloo, 64 images per process) where the demo
   has 2 or more threads (``--ddp``): one thread per process keeps each core busy, where a
   second thread in one process adds only ~1.3x.
2. (a) ``fmnist_classify`` fine-tuning with 1,000 labels (100 per class;
   configs/demo/fmnist_finetune.yaml), from the NEPA checkpoint (patch embedding frozen) and
   from scratch with the same recipe;
   (b) the frozen-feature protocols of ``unipred.protocols`` with all 60,000 labels
   (configs/demo/fmnist_probe.yaml): kNN, linear probe, attentive probe and the per-layer
   probe sweep, on the NEPA backbone and on the same backbone at random init; one feature
   pass per backbone (what ``unipred evaluate-suite`` runs), read as the probe recipe's
   ``eval_defaults`` say (every token of block 3, a 4 x 4 grid); and k-NN and the linear probe
   on the raw input, the baselines ``unipred eval`` prints: the tokenizer's patches read the
   same way (every patch in place), and flattened.
   Stages 2a and 2b run as two processes of one thread each (NEPA's; scratch, random init and
   raw input) where the demo has two or more threads: a model this small gains little from a
   second thread, so two single-threaded stages at once finish sooner than one after the other.
3. Top-1 accuracy on the 10,000 test images: printed, and written to OUT/results.md and
   OUT/results.json with the wall time of each stage; plots in OUT/plots/ (loss curves,
   accuracy bars, next-embedding prediction maps).

Every stage is an ordinary engine run (``unipred.train.engine.fit``) of a config a user can rerun
with ``unipred fit``. Data: Debian's ``dataset-fashion-mnist``, else torchvision's download.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from unipred.base.threads import set_threads
from unipred.train.config import packaged_configs

CONFIGS = packaged_configs() / "demo"


@dataclass
class Plan:
    pretrain_steps: int = 1000
    pretrain_batch: int = 128
    train_images: int = 0  # pretraining / probe images (0 = all 60,000)
    test_images: int = 0  # evaluation images (0 = all 10,000)
    labels_per_class: int = 100  # fine-tuning labels per class
    finetune_steps: int = 600  # batch 100
    probe_epochs: int = 100  # linear probe epochs over the frozen (cached) features
    attentive_epochs: int = 10  # attentive probe epochs (over cached tokens)
    layers_epochs: int = 30  # per-layer probe sweep epochs


PLANS = {"full": Plan(), "quick": Plan(100, 128, 10_000, 2_000, 100, 100, 3, 1, 1)}
PROTOCOLS = ("knn", "linear", "attentive", "layers")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipred demo image", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (~2 minutes)")
    p.add_argument("--out", default="runs/demo_image", help="folder for runs, table and plots")
    p.add_argument("--data", default="", help="folder with the IDX files; 'generated' = "
                   "stand-in data (tests); default: Debian's, else torchvision's download")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the cores the load "
                   "average says are idle, at least 1)")  # fmt: skip
    p.add_argument("--ddp", choices=("auto", "on", "off"), default="auto",
                   help="pretrain as 2 data-parallel processes of 1 thread each (gloo), the "
                   "global batch unchanged (auto: when the demo has 2 or more threads)")  # fmt: skip
    p.add_argument("--parallel", choices=("auto", "on", "off"), default="auto",
                   help="run the stages after pretraining as 2 processes (auto: unless --threads "
                   "1 or a 1-core machine; each process gets half the threads, at least 1)")  # fmt: skip
    for f, v in asdict(Plan()).items():
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None,
                       help=f"override the plan (full: {v})")  # fmt: skip
    return p


def _plan(args) -> Plan:
    plan = PLANS["quick" if args.quick else "full"]
    for f in asdict(plan):
        if getattr(args, f) is not None:
            setattr(plan, f, getattr(args, f))
    return plan


def data_root(spec: str) -> str:
    """The data.root for the stages: '' (generated) or a folder holding the IDX files."""
    if spec == "generated":
        return ""
    from unipred.tasks.image.fmnist_data import has_fashion_mnist, locate

    if spec:
        if not has_fashion_mnist(spec):
            raise FileNotFoundError(f"--data {spec}: no Fashion-MNIST IDX files there")
        return spec
    return str(locate())


# ------------------------------------------------------------------------------- stages
class Demo:
    """The demo's stages, each one ``fit`` of a configs/demo/ file plus overrides."""

    def __init__(self, out: Path, plan: Plan, root: str, seed: int):
        self.out, self.plan, self.seed, self.root = out, plan, seed, root
        self.layout = ""  # how the stages after pretraining ran (run_groups)
        self.pretrain_layout = ""  # 1 process, or DDP processes (pretrain)
        self.common = [f"data.root={root}" if root else "data.root=''", f"seed={seed}",
                       f"data.val_samples={plan.test_images}",
                       f"trainer.progress_bar={sys.stdout.isatty()}"]  # fmt: skip
        if not root:  # generated stand-in data: enough images for the plan's subsets
            n = max(plan.train_images, plan.test_images, 10 * plan.labels_per_class, 512)
            self.common.append(f"data.generated_samples={n}")
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # process CPU seconds: comparable across machine loads
        self.speed: dict[str, float] = {}

    def fit(self, config: str, name: str, overrides: list[str]) -> dict[str, float]:
        """One engine run in OUT/name (replacing an earlier one); returns its final metrics."""
        from unipred.train.config import load_config
        from unipred.train.engine import fit

        run = self.out / name
        if run.exists():
            shutil.rmtree(run)
        cfg = load_config(CONFIGS / config, [*self.common, f"run_dir={run}", *overrides])
        t0, c0 = time.time(), time.process_time()
        trainer = fit(cfg, show_recipe=name == "pretrain")  # the others: recipe.json
        self.times[name], self.cpu[name] = time.time() - t0, time.process_time() - c0
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.speed[name] = _mean_speed(run)
        print(f"[image demo] {name}: {_fmt(metrics)}  ({self.times[name]:.0f}s)", flush=True)
        return metrics

    def pretrain(self, ranks: int = 1, threads: int = 1) -> Path:
        """Stage 1 in this process (``ranks`` 1), or as ``ranks`` data-parallel processes of
        ``threads`` threads each (``fit_ranks``); when those stop, once more here."""
        p = self.plan
        ov = [f"trainer.max_steps={p.pretrain_steps}", f"data.train_samples={p.train_images}",
              f"trainer.global_batch={p.pretrain_batch}"]  # fmt: skip
        self.pretrain_layout = "1 process"
        if ranks > 1:
            rc = self.fit_ranks("fmnist_pretrain.yaml", "pretrain", ov, ranks, threads)
            if rc == 0:
                return self.out / "pretrain" / "checkpoints" / "last.ckpt"
            print(f"[image demo] the {ranks} pretraining processes stopped (exit code {rc}); "
                  "pretraining again in this process", flush=True)  # fmt: skip
            self.pretrain_layout = f"1 process (the {ranks} processes stopped)"
        self.fit("fmnist_pretrain.yaml", "pretrain", ov)
        return self.out / "pretrain" / "checkpoints" / "last.ckpt"

    def fit_ranks(self, config: str, name: str, overrides: list[str], ranks: int,
                  threads: int = 1) -> int:  # fmt: skip
        """One engine run in OUT/name as ``ranks`` DDP processes (gloo on 127.0.0.1) of
        ``threads`` threads each, the global batch split between them: ``unipred fit`` once per rank,
        started here (the environment Lightning reads for processes launched by others), so
        that this process waits for every rank, counts their CPU time, and stops the others
        when one fails. Why: the demo model is too small for a second thread to pay (~1.3x
        at 2 threads), while two processes each keep a core busy. Returns the exit code (the
        first non-zero one); times and speed as ``fit`` records them."""
        import resource

        run = self.out / name
        if run.exists():
            shutil.rmtree(run)
        cmd = [*fit_command(), str(CONFIGS / config), *self.common, f"run_dir={run}",
               *overrides, f"trainer.devices={ranks}", "trainer.strategy=ddp",
               f"trainer.threads={threads}"]  # fmt: skip
        env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": str(threads),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NODE_RANK": "0",
               "WORLD_SIZE": str(ranks)}  # fmt: skip
        if sys.platform.startswith("linux"):  # gloo on the loopback, whatever the hostname says
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.pop("PL_GLOBAL_SEED", None)  # the config's seed rules
        self.pretrain_layout = f"{ranks} DDP processes x {threads} thread(s)"
        print(f"[image demo] {name}: {self.pretrain_layout} (gloo)", flush=True)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        procs = [subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(r)}) for r in range(ranks)]
        rc = _wait_all(procs)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.times[name] = time.time() - t0
        self.cpu[name] = (after.ru_utime + after.ru_stime) - (kids.ru_utime + kids.ru_stime)
        if rc == 0:
            self.speed[name] = _mean_speed(run)
            print(f"[image demo] {name}: done  ({self.times[name]:.0f}s)", flush=True)
        return rc

    def finetune(self, name: str, init: Path | None) -> float:
        p, n = self.plan, 10 * self.plan.labels_per_class
        repeat, rem = divmod(p.finetune_steps * 100, n)  # global batch 100
        if rem or repeat < 1:
            raise ValueError(f"finetune_steps x 100 must be a multiple of the {n} labelled images")
        ov = [f"data.labels_per_class={p.labels_per_class}", f"data.repeat={repeat}"]
        if init is not None:
            ov += [f"model.init=pretrain:{init}", "optim.freeze=[tokenizer.*]"]
        return self.fit("fmnist_finetune.yaml", name, ov)["val/acc1"]

    def frozen(self, name: str, ckpt: Path | str) -> list[dict]:
        """kNN, linear, attentive and per-layer probes of a frozen backbone (``ckpt`` or
        "random"), one feature pass; rows as ``unipred.protocols.run_protocols`` gives them."""
        from unipred.protocols import frozen_eval

        p = self.plan
        t0, c0 = time.time(), time.process_time()
        rows = frozen_eval(
            CONFIGS / "fmnist_probe.yaml",
            [*self.common, f"data.train_samples={p.train_images}", f"run_dir={self.out / name}"],
            str(ckpt), PROTOCOLS,
            [f"linear.epochs={p.probe_epochs}", f"attentive.epochs={p.attentive_epochs}",
             f"layers.epochs={p.layers_epochs}", f"seed={self.seed}"],
            log=lambda line: print(f"[image demo] {name}: {line}", flush=True),
            recipe_defaults=True,
        )  # fmt: skip
        self.times[name], self.cpu[name] = time.time() - t0, time.process_time() - c0
        return rows

    def raw(self, name: str) -> list[dict]:
        """k-NN and linear probe on the raw input (the tokenizer's patches read as ``frozen``
        reads the tokens, weights "input", and flattened, "input_flat"), the baseline rows of
        ``unipred eval``, with the same settings as ``frozen``."""
        from unipred.protocols.baselines import raw_eval

        p = self.plan
        t0, c0 = time.time(), time.process_time()
        rows = raw_eval(
            CONFIGS / "fmnist_probe.yaml",
            [*self.common, f"data.train_samples={p.train_images}", f"run_dir={self.out / name}"],
            [f"linear.epochs={p.probe_epochs}", f"seed={self.seed}"],
            log=lambda line: print(f"[image demo] {name}: {line}", flush=True),
            recipe_defaults=True,
        )  # fmt: skip
        self.times[name], self.cpu[name] = time.time() - t0, time.process_time() - c0
        return rows

    def run(self, job: tuple):
        """One stage after pretraining: ("finetune" | "frozen" | "raw", name, init)."""
        kind, name, init = job
        if kind == "finetune":
            return self.finetune(name, init)
        return self.frozen(name, init) if kind == "frozen" else self.raw(name)


def fit_command() -> list[str]:
    """How a stage process runs ``unipred fit`` (tests replace it)."""
    return [sys.executable, "-m", "unipred.cli", "fit"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: list[subprocess.Popen]) -> int:
    """Wait for every process; when one exits with an error, stop the others (a rank alone
    would wait for its peer until gloo's timeout). Returns 0 or the first error code."""
    rc, deadline = 0, None
    while None in [p.poll() for p in procs]:  # a list: every process polled, each time
        bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if bad and not rc:
            rc, deadline = bad[0], time.time() + 30
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if deadline and time.time() > deadline:  # one stuck in a collective: SIGKILL
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.5)
    return rc or next((p.returncode for p in procs if p.returncode), 0)


def pretrain_ranks(args, cores: int | None = None) -> int:
    """2 data-parallel pretraining processes where the demo has 2 or more threads and the
    machine 2 or more cores (``--ddp auto``), or as ``--ddp on|off`` says; else 1."""
    import torch

    cores = cores or os.cpu_count() or 1
    if args.ddp == "on":
        return 2
    return 2 if args.ddp == "auto" and torch.get_num_threads() >= 2 and cores >= 2 else 1


def cpu_total() -> float:
    """User + system CPU seconds of this process and of its finished children (the stage
    processes of ``run_groups``): what the demo cost the machine, whatever its load."""
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _fmt(m: dict) -> str:
    keys = ("val/acc1", "train/loss", "perf/samples_per_s")
    return ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)


def _mean_speed(run: Path) -> float:
    """Median training samples/s over the run's logged steps (0 when none were logged)."""
    from unipred.tasks.image.demo_plots import read_metrics

    v = sorted(r["perf/samples_per_s"] for r in read_metrics(run) if "perf/samples_per_s" in r)
    return v[len(v) // 2] if v else 0.0


# --------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints the results table and writes results.md/json and plots/."""
    if getattr(sys.modules.get("__mp_main__"), "__name__", "") == "__mp_main__":
        # a stage process of run_groups is importing a script that calls main() without the
        # `if __name__ == "__main__":` guard: stop before it pretrains again
        raise RuntimeError("unipred demo image: call main() under `if __name__ == '__main__':`")
    args = _parser().parse_args(argv)
    _quiet()
    plan, out, t0 = _plan(args), Path(args.out), time.time()
    try:
        import matplotlib  # noqa: F401  (checked now, not after the training)
    except ModuleNotFoundError:
        print("unipred demo image: the plots need matplotlib: pip install 'unipred[plots]'")
        return 2
    try:
        root = data_root(args.data)
    except FileNotFoundError as e:
        print(f"unipred demo image: {e}", flush=True)
        return 2
    load0 = os.getloadavg()
    threads = set_threads(args.threads)
    print(f"[image demo] data: {root or 'generated stand-in'}; plan: {plan}; {threads}", flush=True)
    demo = Demo(out, plan, root, args.seed)
    import torch

    ranks = pretrain_ranks(args)  # with more threads than ranks: the rest split between them
    ckpt = demo.pretrain(ranks, max(1, torch.get_num_threads() // ranks))
    # two groups of about equal length: NEPA's stages; the baselines' (scratch, random, raw)
    groups = [[("finetune", "finetune_nepa", ckpt), ("frozen", "frozen_nepa", ckpt)],
              [("finetune", "finetune_scratch", None), ("frozen", "frozen_random", "random"),
               ("raw", "frozen_raw", None)]]  # fmt: skip
    res = run_groups(demo, groups, args)
    acc = {k: res[k] for k in ("finetune_nepa", "finetune_scratch")}
    raw = res["frozen_raw"]
    frozen = {"NEPA": res["frozen_nepa"], "random init": res["frozen_random"],
              "raw input": [r for r in raw if r["weights"] == "input"],
              "raw input, flattened": [r for r in raw if r["weights"] == "input_flat"]}  # fmt: skip
    for key, col in (("nepa", "NEPA"), ("random", "random init"), ("raw", "raw input"),
                     ("raw_flat", "raw input, flattened")):  # fmt: skip
        for r in frozen[col]:
            acc[f"{r['protocol']}_{key}"] = r["top1"]
    acc["probe_nepa"], acc["probe_random"] = acc["linear_nepa"], acc["linear_random"]
    from unipred.tasks.image import demo_plots as image_plots

    plots = image_plots.write_all(out, acc, demo, root)
    seconds, load1 = time.time() - t0, os.getloadavg()
    table = results_table(acc, frozen, plan, demo, seconds, (load0[0], load1[0]), bool(root))
    table += (f" Threads: {threads}; pretraining: {demo.pretrain_layout}; after pretraining: "
              f"{demo.layout}.")  # fmt: skip
    print(table, flush=True)
    (out / "results.md").write_text(table + "\n")
    from unipred.protocols.report import percent_tree, with_percent

    # percent, as every other results.json of unipred (the unit named in "units")
    info = {"accuracy_pct": percent_tree(acc), "units": {"accuracy_pct": "percent (top-1)"},
            "plan": asdict(plan), "seconds": demo.times,
            "cpu_seconds": demo.cpu, "samples_per_s": demo.speed, "total_seconds": seconds, "total_cpu_seconds": cpu_total(),
            "layout_pretraining": demo.pretrain_layout, "layout_after_pretraining": demo.layout, "data": root or "generated",
            "load_average": [load0[0], load1[0]], "cpus": os.cpu_count(), "threads": threads,
            "frozen": {k: with_percent({"rows": v})["rows"] for k, v in frozen.items()},
            "plots": plots}  # fmt: skip
    (out / "results.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[image demo] results: {out / 'results.md'}; plots: {out / 'plots'}", flush=True)
    return 0


def run_groups(demo: Demo, groups: list[list[tuple]], args) -> dict:
    """The stages after pretraining: each group in a process of its own, at once, with half
    the demo's threads each (at least 1), or all in this process one after the other. Each
    stage is seeded by itself, so the split changes no number (``tests/test_demo.py``);
    returns {stage name: what ``Demo.run`` returned} and fills ``demo``'s times."""
    cores = os.cpu_count() or 1
    n = args.threads or cores
    parallel = args.parallel == "on" or (args.parallel == "auto" and n >= 2 and cores >= 2)
    if not parallel:
        demo.layout = "sequential, this process"
        return {job[1]: demo.run(job) for g in groups for job in g}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    each = max(1, n // len(groups))
    demo.layout = f"{len(groups)} processes x {each} thread(s)"
    print(f"[image demo] the stages after pretraining: {demo.layout}", flush=True)
    # spawn, not fork: a forked child of a process that has run OpenMP threads can hang
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(len(groups), mp_context=ctx) as pool:
            futures = [pool.submit(_group_worker, demo.out, demo.plan, demo.root, demo.seed, g,
                                   each) for g in groups]  # fmt: skip
            results = [f.result() for f in futures]
    except BrokenProcessPool as e:
        # a stage process died (killed for memory; or main() called from a script without
        # the `if __name__ == "__main__":` guard that spawn needs): the stages are seeded, so
        # running them here gives the same numbers
        print(f"[image demo] the stage processes stopped ({e}); running the stages here, "
              "one after the other", flush=True)  # fmt: skip
        demo.layout = "sequential, this process (the stage processes stopped)"
        return {job[1]: demo.run(job) for g in groups for job in g}
    out = {}
    for r in results:
        out.update(r["results"])
        demo.times.update(r["times"])
        demo.cpu.update(r["cpu"])
        demo.speed.update(r["speed"])
    return out


def _group_worker(out: Path, plan: Plan, root: str, seed: int, jobs: list[tuple],
                  threads: int) -> dict:  # fmt: skip
    """One process's stages (``run_groups``): its results and per-stage times."""
    set_threads(threads)
    _quiet()
    demo = Demo(out, plan, root, seed)
    results = {job[1]: demo.run(job) for job in jobs}
    return {"results": results, "times": demo.times, "cpu": demo.cpu, "speed": demo.speed}


def _quiet() -> None:
    """Keep the demo's output to its own progress lines: no Lightning tips and notices."""
    for name in ("lightning.pytorch", "lightning.fabric", "unipred.tasks.image.fashion_mnist"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for msg in ("Total length of", ".*LeafSpec", ".*does not have many workers"):
        warnings.filterwarnings("ignore", message=msg)


def results_table(acc: dict, frozen: dict, plan: Plan, demo: Demo, seconds: float, load,
                  real=True) -> str:  # fmt: skip
    """The results as markdown tables (fine-tuning; frozen protocols) plus a line on the budget
    actually used."""
    from unipred.protocols import comparison_markdown

    n_lab, n_train = 10 * plan.labels_per_class, plan.train_images or 60_000
    rows = [
        ("NEPA-pretrained", "finetune_nepa"),
        ("from scratch (same recipe)", "finetune_scratch"),
    ]
    lines = [f"Fine-tuning with {n_lab:,} labels:", "",
             "| model | test top-1 | stage wall / CPU time |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {m} | {100 * acc[k]:.1f} % | {demo.times[k]:.0f} s / {demo.cpu[k]:.0f} s |"
              for m, k in rows]  # fmt: skip
    t = {k: f"{demo.times[k]:.0f} s / {demo.cpu[k]:.0f} s" for k in
         ("frozen_nepa", "frozen_random", "frozen_raw")}  # fmt: skip
    lines += ["", f"Frozen backbone, all {n_train:,} training labels (unipred.protocols, read "
              f"as fmnist_probe.yaml's eval_defaults say; one feature pass and all four "
              f"protocols, wall / CPU time: NEPA {t['frozen_nepa']}, random init "
              f"{t['frozen_random']}; raw input read alike and flattened, k-NN and linear: "
              f"{t['frozen_raw']}):", "",
              comparison_markdown(frozen)]  # fmt: skip
    lines.append(
        f"\n{'Fashion-MNIST' if real else 'Generated stand-in data'}, "
        f"{plan.test_images or 10_000:,} test images. Pretraining: "
        f"{plan.pretrain_steps} steps x {plan.pretrain_batch} images ({demo.times['pretrain']:.0f} s wall, "
        f"{demo.cpu['pretrain']:.0f} s CPU, "
        f"{demo.speed['pretrain']:.0f} img/s); fine-tuning {plan.finetune_steps} steps x 100; "
        f"probes: linear {plan.probe_epochs}, attentive {plan.attentive_epochs}, per-layer "
        f"{plan.layers_epochs} epochs. Total {seconds / 60:.1f} min ({cpu_total() / 60:.1f} "
        f"min of CPU, all processes) on {os.cpu_count()} CPUs, load average {load[0]:.1f} at "
        f"the start, {load[1]:.1f} at the end."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
