"""How visible a slow shard store is: one short pretraining epoch read from local shards, then
the same shards served over HTTP on 127.0.0.1 at a limited bandwidth (the fault-injecting
server of tests/fixtures/faulty_http.py, every shard "slow": 40 kB/s). Prints each run's wall
time and its last ``perf/data_wait`` (the fraction of step time spent waiting for data).

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/remote_shards.py /tmp/remote_bench
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unipred.data.cli import main as data_cli
from unipred.train.config import load_config
from unipred.train.engine import fit

SERVER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faulty_http.py"


def pack(tmp: Path, n: int, per_shard: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = tmp / "src" / f"c{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / "x.jpg")
    out = tmp / "shards"
    data_cli(["pack-images", str(tmp / "src"), str(out), "--workers", "1",
              "--max-per-shard", str(per_shard), "--overwrite"])  # fmt: skip
    return out


def run(root: str, run_dir: Path, workers: int) -> tuple[float, float]:
    cfg = load_config(None, [
        "task=image_pretrain", "model.name=nepa_debug", f"data.root={root}",
        "data.aug.img_size=16", "trainer.global_batch=8", "trainer.progress_bar=false",
        "trainer.loggers=[csv]", "trainer.accelerator=cpu", "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1", "ema.enabled=false", "trainer.collapse_every_n_steps=0",
        f"data.num_workers={workers}", "data.val_root=''", f"run_dir={run_dir}",
        "trainer.threads=1"])  # fmt: skip
    t0 = time.monotonic()
    fit(cfg, show_recipe=False)
    took = time.monotonic() - t0
    rows = (run_dir / "logs/version_0/metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("perf/data_wait")
    waits = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    return took, waits[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="a scratch folder")
    p.add_argument("--samples", type=int, default=80)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    shards = pack(a.out, a.samples, 8)
    names = sorted(x.name for x in shards.glob("*.tar"))
    res = {"local": run(str(shards), a.out / "local", a.workers)}
    port_file = a.out / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, str(SERVER), str(shards), str(port_file),
                               str(a.out / "requests.log"), json.dumps(dict.fromkeys(names, "slow"))])  # fmt: skip
    try:
        while not (port_file.exists() and port_file.read_text()):
            time.sleep(0.05)
        stem = names[0].rsplit("-", 1)[0]
        spec = (
            f"http://127.0.0.1:{port_file.read_text()}/{stem}-{{000000..{len(names) - 1:06d}}}.tar"
        )
        res["http_40kB_per_s"] = run(spec, a.out / "http", a.workers)
    finally:
        server.kill()
    for name, (took, wait) in res.items():
        print(f"{name:16s} {took:6.1f} s   perf/data_wait {wait:.2f}")


if __name__ == "__main__":
    main()
