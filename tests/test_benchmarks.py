"""The benchmark scripts run (tiny sizes, CPU), and compiled models do not recompile per step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unipred.nn.model import NEPA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["nepa_debug", "nepa_video_debug", "nepa_audio_debug"])
def test_compiled_model_does_not_recompile_on_the_next_step(name):
    """The tokenizers cache coordinate grids in a dict; a lookup traced into the graph made
    dynamo recompile the whole model on its second call."""
    torch._dynamo.reset()
    model = NEPA.from_name(name)
    run = torch.compile(model, backend="eager")  # dynamo only: fast, same guards
    x = model.tokenizer.example_input(2)
    run(x).loss.backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            run(x).loss.backward()
    torch._dynamo.reset()


# slow: a benchmark script run end to end (the suite stays under ~10 min on 2 cores)
@pytest.mark.slow
def test_gpu_profile_dry_run(tmp_path):
    cmd = [sys.executable, "-P", str(ROOT / "benchmarks/gpu_profile.py"), "--dry-run", "--reps", "1",
           "--only", "gemm", "sdpa", "step", "--variants", "base", "--no-compile", "--steps", "1",
           "--warmup", "1"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(ln) for ln in (tmp_path / "gpu_profile.jsonl").read_text().splitlines()]
    by = {(r["section"], r.get("variant")): r for r in recs}
    assert by[("gemm", None)]["step_gemm_ms"] > 0
    assert isinstance(by[("sdpa", None)]["math"], dict)
    step = by[("step", "base")]
    assert "error" not in step and step["images_per_s"] > 0


@pytest.mark.parametrize(
    "extra", [[], pytest.param(["--decode-on-device"], marks=pytest.mark.slow)]
)
def test_loader_against_training_step_dry_run(extra):
    """`data_loader.py --train`: the same step fed from a device batch and from the shard
    loader (2 workers), both timed, with the share of time spent waiting for data."""
    cmd = [sys.executable, "-P", str(ROOT / "benchmarks/data_loader.py"), "--dry-run",
           "--workers", "2", *extra]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["model"] == "nepa_debug" and r["batch"] == 8 and r["workers"] == 2
    assert r["decode"] == ("device" if extra else "cpu workers")
    assert r["step_s_device_batch"] > 0 and r["step_s_loader"] > 0
    assert 0 <= r["data_wait_share"] < 1 and isinstance(r["keeps_up"], bool)


@pytest.mark.parametrize("layout", ["mp4", "frames"])
def test_video_loader_dry_run(layout):
    cmd = [sys.executable, "-P", str(ROOT / "benchmarks/video_loader.py"), "--dry-run",
           "--layout", layout]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["layout"] == layout and r["clips"] == 4 and r["clips_per_s"] > 0


# slow: a benchmark script run end to end (the suite stays under ~10 min on 2 cores)
@pytest.mark.slow
def test_demo_step_writes_the_demo_model_and_times_it(tmp_path):
    """benchmarks/demo_step.py: the JSON of the demo's model config rebuilds the same model."""
    cfg = tmp_path / "m.json"
    run = [sys.executable, "-P", str(ROOT / "benchmarks/demo_step.py")]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*run, "--write-config", str(cfg)], capture_output=True, text=True,
                       timeout=300, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(cfg.read_text())
    assert d["tokenizer_args"] == {"patch_size": 7, "in_chans": 1} and d["predictor"]["dim"] == 128
    p = subprocess.run([*run, "--config", str(cfg), "--batch", "4", "--steps", "1"],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["batch"] == 4 and rec["ms_per_step"] > 0 and rec["precision"] == "bf16"


# slow: a benchmark script run end to end (the suite stays under ~10 min on 2 cores)
@pytest.mark.slow
def test_cpu_profile_quick_runs_every_part():
    """benchmarks/cpu_profile.py --quick on the tiny size: the step split, the op table and
    the alternating ratios of every variant (dynamo's eager backend stands in for inductor
    to keep it short; no timing is asserted, only that each figure was measured)."""
    cmd = [sys.executable, "-P", str(ROOT / "benchmarks/cpu_profile.py"), "--model", "debug",
           "--quick", "--compile-backend", "eager", "--rows", "5", "--data", "--attention"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    recs = {
        r["part"]: r for r in (json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{"))
    }
    split = recs["split"]
    assert set(split["ms"]) == {"forward", "backward", "optimizer"}
    assert all(v > 0 for v in split["ms"].values()) and abs(sum(split["share"].values()) - 1) < 0.01
    ops = recs["ops"]["ops"]
    assert len(ops) == 5 and any(o["op"].startswith("aten::") for o in ops)
    r = recs["ratios"]
    assert r["base"]["speedup_per_round"] == [1.0, 1.0, 1.0]
    compiled = ("compile", "bf16_compile", "bf16_fused_compile")
    for name in ("bf16", "bf16_math_attention", "fused", *compiled):
        assert len(r[name]["speedup_per_round"]) == 3 and r[name]["speedup_vs_base"] > 0
    assert set(r["compile_s"]) == set(compiled) and r["compile_mode"] == "blocks"
    att = recs["attention"]
    assert all(v["math"] > 0 and v["unipred"] > 0 for k, v in att.items() if k.startswith("B"))
    data = recs["data"]
    assert data["seeded_per_sample"] > 0 and data["unseeded"] > 0
