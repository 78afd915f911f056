"""`unipred demo image` and its parts: the Fashion-MNIST reader, the fmnist tasks, the demo."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from unipred.tasks.image.fmnist_data import DEBIAN_DIR, has_fashion_mnist, read_idx, read_split

HAVE_FMNIST = has_fashion_mnist(DEBIAN_DIR)


def _idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fake_fmnist(folder: Path, n_train=40, n_test=20, gz=True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


def test_reader_gz_and_torchvision_layout(tmp_path):
    _fake_fmnist(tmp_path / "deb")
    x, y = read_split(tmp_path / "deb", "train")
    assert x.shape == (40, 28, 28) and x.dtype == torch.uint8
    assert y.tolist() == [i % 10 for i in range(40)] and y.dtype == torch.int64
    # torchvision's download layout: ROOT/FashionMNIST/raw/, here without .gz
    _fake_fmnist(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    assert has_fashion_mnist(tmp_path / "tv")
    assert read_split(tmp_path / "tv", "test")[0].shape == (20, 28, 28)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        read_split(tmp_path, "train")
    _fake_fmnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        read_split(tmp_path, "val")
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-5]))  # truncated
    with pytest.raises(ValueError, match="truncated"):
        read_idx(f)
    f.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)))  # float IDX
    with pytest.raises(ValueError, match="magic"):
        read_idx(f)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_files():
    x, y = read_split(DEBIAN_DIR, "test")
    assert x.shape == (10_000, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_random_shift_and_subsets():
    from unipred.tasks.image.fashion_mnist import generated, per_class_subset, random_shift

    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    torch.manual_seed(0)
    s = random_shift(x, 2)
    assert s.shape == x.shape and torch.all(s.sum(dim=(1, 2, 3)) == 1)  # nothing falls off
    pos = s[:, 0].flatten(1).argmax(dim=1)
    dy, dx = pos // 28 - 14, pos % 28 - 14
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2 and len(set(pos.tolist())) > 5
    assert torch.equal(random_shift(x, 0), x)
    imgs, labels = generated(200, seed=3)
    a = per_class_subset(imgs, labels, 4, seed=0)
    b = per_class_subset(imgs, labels, 4, seed=0)
    assert torch.bincount(a[1]).tolist() == [4] * 10 and torch.equal(a[0], b[0])
    assert not torch.equal(a[0], per_class_subset(imgs, labels, 4, seed=1)[0])
    with pytest.raises(ValueError, match="labels_per_class"):
        per_class_subset(imgs, labels, 21, seed=0)


def _task(overrides):
    from unipred.base.registry import TASKS
    from unipred.train.config import load_config

    cfg = load_config(None, ["task=fmnist_classify", "model.name=nepa_debug",
                             "model.tokenizer_args.in_chans=1", "model.tokenizer_args.patch_size=7",
                             *overrides])  # fmt: skip
    return TASKS.get("fmnist_classify")(cfg)


def test_probe_features_are_cached_and_frozen():
    task = _task(["data.mode=probe", "data.generated_samples=16"])
    model = task.build_model()
    ds = task.build_dataset("train")
    batch = task.collate_fn("train")([ds[i] for i in range(8)])
    assert len(batch) == 3  # (images, labels, indices) for the cache
    calls = []
    model.tokenizer.register_forward_hook(lambda *a: calls.append(1))
    loss1, _ = task.training_step(model, batch)
    loss1.backward()
    loss2, _ = task.training_step(model, batch)
    assert len(calls) == 1  # the second step reused the cached features
    assert model.head.classifier.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))
    val = task.collate_fn("val")([task.build_dataset("val")[i] for i in range(4)])
    assert len(val) == 2 and val[0].shape == (4, 1, 28, 28)


def test_labelled_subset_and_val_root():
    task = _task(["data.labels_per_class=3", "data.generated_samples=100", "data.repeat=2"])
    ds = task.build_dataset("train")
    assert len(ds) == 60 and torch.bincount(ds.labels).tolist() == [3] * 10
    with pytest.raises(ValueError, match="val_root"):
        _task(["data.val_root=/tmp"]).build_dataset("train")


def _check_outputs(out: Path) -> dict:
    info = json.loads((out / "results.json").read_text())
    frozen = {
        f"{p}_{m}" for p in ("knn", "linear", "attentive", "layers") for m in ("nepa", "random")
    } | {"knn_raw", "linear_raw", "knn_raw_flat", "linear_raw_flat"}  # raw: k-NN, linear only
    assert info["units"] == {"accuracy_pct": "percent (top-1)"}
    assert set(info["accuracy_pct"]) == {"finetune_nepa", "finetune_scratch", "probe_nepa",
                                     "probe_random"} | frozen  # fmt: skip
    assert all(0.0 <= a <= 100.0 for a in info["accuracy_pct"].values())
    # the linear probe is the protocols' one (unipred.protocols), on both backbones
    assert info["accuracy_pct"]["probe_nepa"] == info["accuracy_pct"]["linear_nepa"]
    # the frozen rows in percent too, as evaluate-suite's results.json
    assert all("top1_pct" in r and "top1" not in r for r in info["frozen"]["NEPA"])
    assert [r["weights"] for r in info["frozen"]["random init"]] == ["random"] * 4
    assert [(r["protocol"], r["weights"]) for r in info["frozen"]["raw input"]] == [
        ("knn", "input"), ("linear", "input")]  # fmt: skip
    assert [r["weights"] for r in info["frozen"]["raw input, flattened"]] == ["input_flat"] * 2
    table = (out / "results.md").read_text()
    assert table.count("| NEPA-pretrained") == 1
    assert "| protocol | NEPA | random init | raw input | raw input, flattened |" in table
    assert table.count(" — |") == 4  # no attentive / per-layer row on either raw input
    for row in ("| kNN (k=20, T=0.07) |", "| linear probe |", "| attentive probe |",
                "| per-layer probe, best layer |"):  # fmt: skip
        assert row in table
    for name in ("loss_curves", "accuracy", "prediction_maps"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000
    assert len(list((out / "plots" / "maps").glob("*.png"))) == 6
    # every stage is a plain engine run whose config can be rerun with `unipred fit`
    for stage in ("pretrain", "finetune_nepa", "finetune_scratch"):
        assert (out / stage / "config.yaml").is_file()
    assert (out / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    return info


def test_demo_tiny_end_to_end(tmp_path, capfd):
    """The whole demo (all five engine runs, table, plots) on generated data, tiny plan; the
    stages after pretraining in 2 processes give the numbers they give one after the other."""
    from unipred.tasks.image.demo import main

    argv = ["--quick", "--data", "generated", "--pretrain-steps", "2", "--threads", "1",
            "--train-images", "1024", "--test-images", "64", "--labels-per-class", "5",
            "--finetune-steps", "1", "--probe-epochs", "1"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "par"), "--parallel", "on"]) == 0
    out = capfd.readouterr().out
    assert out.count("effective recipe:") == 1  # not once per stage
    assert "the stages after pretraining: 2 processes x 1 thread(s)" in out
    assert "features (block 3, grid 4 per axis pooling)" in out  # the recipe's eval_defaults
    info = _check_outputs(tmp_path / "par")
    assert info["plan"]["pretrain_steps"] == 2 and info["data"] == "generated"
    assert all(
        (tmp_path / "par" / s / "recipe.json").is_file() for s in ("pretrain", "finetune_nepa")
    )
    assert set(info["seconds"]) == {"pretrain", "finetune_nepa", "finetune_scratch",
                                    "frozen_nepa", "frozen_random", "frozen_raw"}  # fmt: skip
    assert info["total_cpu_seconds"] > info["cpu_seconds"]["pretrain"]  # the children counted
    assert main([*argv, "--out", str(tmp_path / "seq"), "--parallel", "off"]) == 0
    seq = json.loads((tmp_path / "seq" / "results.json").read_text())
    assert seq["layout_after_pretraining"] == "sequential, this process"
    assert (
        seq["accuracy_pct"] == info["accuracy_pct"]
        and seq["frozen"].keys() == info["frozen"].keys()
    )
    for col in info["frozen"]:
        assert [r["top1_pct"] for r in seq["frozen"][col]] == [
            r["top1_pct"] for r in info["frozen"][col]
        ]


def test_demo_missing_data_message(tmp_path, capsys):
    from unipred.tasks.image.demo import main

    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no Fashion-MNIST IDX files" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_demo_quick_real(tmp_path):
    """`unipred demo image --quick` on Fashion-MNIST (about 2 minutes on 2 idle cores)."""
    from unipred.tasks.image.demo import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    info = _check_outputs(tmp_path)
    assert info["accuracy_pct"]["finetune_scratch"] > 30  # 10 classes: chance is 10 %


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_demo_full(tmp_path):
    """The full `make demo`: the linear probe of the NEPA
    features beats the frozen random-init model by a wide margin, and NEPA initialisation
    beats scratch fine-tuning by 3 points."""
    from unipred.tasks.image.demo import main

    assert main(["--out", str(tmp_path)]) == 0
    acc = _check_outputs(tmp_path)["accuracy_pct"]
    assert acc["probe_nepa"] > acc["probe_random"] + 10
    # the fine-tuning target (measured: 78.7 % vs 75.6 %)
    assert acc["finetune_nepa"] >= acc["finetune_scratch"] + 3


def test_stage_processes_that_die_fall_back_to_this_process(monkeypatch, capsys):
    """A broken stage pool (a process killed for memory) reruns the stages here, seeded alike;
    a spawn child importing an unguarded script that calls main() stops before pretraining."""
    import concurrent.futures
    import sys
    import types
    from argparse import Namespace
    from concurrent.futures.process import BrokenProcessPool

    from unipred.tasks.image import demo as d

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def submit(self, *a):
            f = concurrent.futures.Future()
            f.set_exception(BrokenProcessPool("a child died"))
            return f

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Broken)
    ran = []
    stub = types.SimpleNamespace(out=None, plan=None, root="", seed=0, layout="",
                                 run=lambda job: ran.append(job[1]) or job[2])  # fmt: skip
    groups = [[("finetune", "a", 1)], [("frozen", "b", 2), ("raw", "c", 3)]]
    res = d.run_groups(stub, groups, Namespace(threads=2, parallel="on"))
    assert res == {"a": 1, "b": 2, "c": 3} and ran == ["a", "b", "c"]
    assert "the stage processes stopped (a child died)" in capsys.readouterr().out
    assert stub.layout.startswith("sequential")
    off = d.run_groups(stub, groups, Namespace(threads=2, parallel="off"))
    assert off == res and stub.layout == "sequential, this process"

    child_main = types.ModuleType("__mp_main__")  # what spawn imports a script as
    monkeypatch.setitem(sys.modules, "__mp_main__", child_main)
    with pytest.raises(RuntimeError, match="__name__ == '__main__'"):
        d.main(["--quick"])


def _tiny_demo(out: Path):
    """A Demo on generated data, tiny plan, augmentation off (so a batch split between two
    ranks is the same images, the same pixels, as one process's batch): the batch-level shift
    and flip, and RoPE's random rescaling (each rank draws its own, as each batch does)."""
    from unipred.tasks.image.demo import Demo, Plan

    plan = Plan(pretrain_steps=3, pretrain_batch=16, train_images=64, test_images=16)
    demo = Demo(out, plan, "", 0)
    demo.common += [
        "data.shift=0",
        "data.hflip=false",
        "model.predictor.rope_rescale=0",
        "trainer.loggers=[]",
    ]
    return demo


@pytest.mark.slow
def test_ddp_pretraining_equals_one_process(tmp_path):
    """The demo's 2-process pretraining (a real `unipred fit` per rank, gloo) ends with the
    weights of the one-process run, same seed and global batch (fp32); about a minute."""
    from unipred.train.checkpoint import read_checkpoint

    weights = {}
    for ranks in (1, 2):
        demo = _tiny_demo(tmp_path / f"r{ranks}")
        # fp32: under bf16 autocast a batch of 8 rounds unlike a batch of 16, and Adam's first
        # steps turn those roundings into differences of up to the learning rate
        demo.common.append("trainer.precision=32")
        ckpt = demo.pretrain(ranks)
        assert demo.pretrain_layout == (
            "1 process" if ranks == 1 else "2 DDP processes x 1 thread(s)"
        )
        ck = read_checkpoint(ckpt, require_training_state=True)
        assert ck["global_step"] == 3
        weights[ranks] = ck["state_dict"]
        assert demo.cpu["pretrain"] > 0 and demo.times["pretrain"] > 0
    for k, w in weights[1].items():
        torch.testing.assert_close(weights[2][k], w, rtol=1e-4, atol=1e-5, msg=k)
    # and steps 2-3 moved the weights by 100x the tolerance or more (a run of 1 step)
    one = _tiny_demo(tmp_path / "one_step")
    one.common.append("trainer.precision=32")
    one.plan.pretrain_steps = 1
    early = read_checkpoint(one.pretrain(1), require_training_state=True)["state_dict"]
    assert max(float((early[k] - w).abs().max()) for k, w in weights[1].items()) > 1e-3


def test_ddp_pretraining_that_stops_falls_back_to_this_process(tmp_path, monkeypatch, capsys):
    """When the pretraining processes exit with an error, the demo pretrains in its own
    process (once), says so in one line and names that layout; --ddp picks the ranks."""
    import sys
    from argparse import Namespace

    from unipred.tasks.image import demo as d

    # rank 1 fails at once; rank 0 would wait for it (as in a collective): it is stopped
    code = (
        "import os, sys, time; sys.exit(3) if os.environ['LOCAL_RANK'] == '1' else time.sleep(60)"
    )
    monkeypatch.setattr(d, "fit_command", lambda: [sys.executable, "-c", code])
    ran = []
    monkeypatch.setattr(d.Demo, "fit", lambda self, config, name, ov: ran.append((name, ov)))
    demo = _tiny_demo(tmp_path)
    ckpt = demo.pretrain(2)
    assert ckpt == tmp_path / "pretrain" / "checkpoints" / "last.ckpt"
    assert [r[0] for r in ran] == ["pretrain"] and "trainer.max_steps=3" in ran[0][1]
    out = capsys.readouterr().out
    assert "the 2 pretraining processes stopped (exit code 3); pretraining again in this" in out
    assert demo.pretrain_layout == "1 process (the 2 processes stopped)"
    assert demo.times["pretrain"] < 30  # rank 0 was stopped, not waited for
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert d.pretrain_ranks(Namespace(ddp="auto"), cores=2) == 2
        assert d.pretrain_ranks(Namespace(ddp="off"), cores=2) == 1
        assert d.pretrain_ranks(Namespace(ddp="auto"), cores=1) == 1
        torch.set_num_threads(1)
        assert d.pretrain_ranks(Namespace(ddp="auto"), cores=2) == 1
        assert d.pretrain_ranks(Namespace(ddp="on"), cores=1) == 2
    finally:
        torch.set_num_threads(torch_threads)
