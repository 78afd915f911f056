"""Time one bf16 training step of the image demo's model, so two torch builds can be compared.

    .venv/bin/python benchmarks/demo_step.py --write-config /tmp/demo_model.json
    .venv/bin/python benchmarks/demo_step.py --config /tmp/demo_model.json --threads 1
    /other/venv/bin/python benchmarks/demo_step.py --config /tmp/demo_model.json --threads 1

The first form builds the model config of ``configs/demo/fmnist_pretrain.yaml`` through its task
(needs the whole project) and writes it as JSON; the others rebuild the model from that JSON with
nothing but torch and unipred's core and image tokenizer, so an environment holding only another
torch (no torchvision, no Lightning) can run them. One step = forward (the pretraining loss) +
backward + AdamW, random images; prints the median of ``--steps`` steps after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def write_config(path: str) -> None:
    from unipred.base.registry import TASKS
    from unipred.train.config import load_config, packaged_configs

    cfg = load_config(packaged_configs() / "demo" / "fmnist_pretrain.yaml", [], check_paths=False)
    mc = TASKS.get(cfg.task)(cfg).model_config(head="none")
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(mc), f, indent=1)
    print(f"wrote {path}")


def build(path: str):
    import unipred.tokenizers.image  # noqa: F401  (registers the image tokenizer)

    from unipred.nn.model import NEPA, ModelConfig
    from unipred.nn.objectives import ObjectiveConfig
    from unipred.nn.predictor import PredictorConfig

    d = json.load(open(path))
    d["predictor"] = PredictorConfig(**d["predictor"])
    d["objective"] = ObjectiveConfig(**d["objective"])
    return NEPA(ModelConfig(**d))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-config", default="")
    ap.add_argument("--config", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--fp32", action="store_true")
    a = ap.parse_args()
    if a.write_config:
        write_config(a.write_config)
        return 0
    if not a.config:
        ap.error("give --write-config PATH or --config PATH")
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build(a.config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    size = 28
    x = torch.randn(a.batch, model.cfg.tokenizer_args.get("in_chans", 3), size, size)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.fp32):
            loss = model(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"torch": torch.__version__, "threads": a.threads, "batch": a.batch,
                      "precision": "fp32" if a.fp32 else "bf16", "ms_per_step": round(1e3 * med, 1),
                      "images_per_s": round(a.batch / med)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
