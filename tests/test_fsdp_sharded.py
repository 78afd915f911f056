"""FSDP2 (``trainer.strategy=fsdp2``) with sharded distributed checkpoints, resharded on load.

* a real gloo run on CPU (FSDP2 through Lightning's ModelParallelStrategy) on W ranks is
  killed after its step-2 checkpoint, a folder holding one shard file per rank, and resumed
  with ``resume=auto`` on W' ranks (2 -> 1, 4 -> 2): it starts at step 2 with the scheduler,
  the learning rate and the optimizer moments of the checkpoint, and ends with the weights and
  optimizer state of the uninterrupted W-rank run (to float32 reduction-order tolerance);
* the EMA (``ema.enabled``) is sharded like the weights, saved in the same folder and resharded
  on resume: the resumed run ends with the EMA of the uninterrupted one; ``unipred export --ema``
  and ``model.init=pretrain:FOLDER:ema`` read it;
* the sharded EMA is the unsharded EMA's arithmetic on each slice, and goes through DCP and
  back (one gloo rank, in this process);
* a sharded checkpoint is read back whole on one process (``read_checkpoint``), and one whose
  DCP index pickle, or a non-tensor entry of whose shard files, carries code is refused before
  anything in it runs.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unipred.train.checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint

SCRIPT = Path(__file__).parent / "fixtures" / "fsdp_fit.py"


def _images(root: Path, n: int) -> Path:
    """``n`` random 20x24 JPEGs, one class folder each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i:03d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            root / f"c{i:03d}" / "x.jpg"
        )
    return root


def _fit(args, timeout=500):
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow  # three gloo runs (W, W and W' processes): 6 min or more on 2 loaded cores
@pytest.mark.parametrize(("world", "new_world"), [(2, 1), (4, 2)])
def test_fsdp2_run_killed_resumes_on_another_world_size_from_its_sharded_checkpoint(
    tmp_path, world, new_world
):
    images = _images(tmp_path / "src", 48)
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = _fit([images, full, world, 1, 0])
    assert p.returncode == 0, p.stderr[-3000:]
    p = _fit([images, cut, world, 1, 3])
    assert p.returncode != 0 and "killed at step 3" in p.stderr, p.stderr[-3000:]
    step2 = cut / "checkpoints" / "step00000002.ckpt"
    # a DCP folder: one shard file per rank, DCP's index, Lightning's meta.pt
    assert sorted(x.name for x in step2.iterdir()) == [
        ".metadata", *(f"__{r}_0.distcp" for r in range(world)), "meta.pt"]  # fmt: skip
    assert not list((cut / "checkpoints").glob(".*")), "a temporary was left"
    p = _fit([images, cut, new_world, 2, 0])
    assert p.returncode == 0, p.stderr[-3000:]
    line = f"resuming on {new_world} devices (saved on {world}) with the same global batch 8"
    assert line in p.stdout, p.stdout[-3000:]
    start = json.loads((cut / "start-2.json").read_text())
    first = json.loads((full / "start-1.json").read_text())
    assert start["global_step"] == 2 and start["scheduler_step"] == 2, start
    assert start["optimizer_state"] > 0 and first["optimizer_state"] == 0  # moments loaded
    assert start["lr"] != first["lr"]  # the schedule went on from step 2

    a = read_checkpoint(full / "checkpoints" / "last.ckpt", require_training_state=True)
    b = read_checkpoint(cut / "checkpoints" / "last.ckpt", require_training_state=True)
    assert len(list((cut / "checkpoints" / "last.ckpt").glob("*.distcp"))) == new_world
    assert a["global_step"] == b["global_step"] == 6
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 6
    init = read_checkpoint(step2)["state_dict"]
    moved = 0.0
    for k, v in a["state_dict"].items():
        # W' ranks sum the batch's gradients in another order than W ranks' reduce-scatter
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-3  # steps 3-6 changed the weights well beyond the tolerance
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 10
    for fqn, st in sa.items():
        for name, v in st.items():
            torch.testing.assert_close(sb[fqn][name], v, rtol=1e-4, atol=1e-7, msg=(fqn, name))

    # the EMA: sharded in the folder, resharded on resume, and continued from step 2's
    assert int(a["ema_n_averaged"]) == int(b["ema_n_averaged"]) == 6
    assert int(read_checkpoint(step2)["ema_n_averaged"]) == 2
    ea, eb = a["ema_state_dict"], b["ema_state_dict"]
    assert ea.keys() == {k[6:] for k in a["state_dict"]} == eb.keys()
    for k, v in ea.items():
        torch.testing.assert_close(eb[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert max(float((v - a["state_dict"]["model." + k]).abs().max()) for k, v in ea.items()) > 1e-3

    # what the folder gives other commands: `unipred export --ema`, `model.init=pretrain:...:ema`
    from unipred.cli import main
    from unipred.nn.model import NEPA
    from unipred.train.checkpoint import apply_init

    last = cut / "checkpoints" / "last.ckpt"
    assert main(["export", str(last), str(tmp_path / "exported"), "--ema"]) == 0
    model = NEPA.from_pretrained(tmp_path / "exported")
    for k, v in model.state_dict().items():
        assert torch.equal(v, eb[k]), k
    fresh = NEPA.from_pretrained(tmp_path / "exported")
    for t in fresh.parameters():
        torch.nn.init.zeros_(t)
    apply_init(fresh, f"pretrain:{last}:ema")
    assert all(torch.equal(v, eb[k]) for k, v in fresh.state_dict().items() if k in eb)


def _sharded(folder: Path) -> Path:
    """A small sharded checkpoint written by DCP on one process, as Lightning lays it out."""
    import torch.distributed.checkpoint as dcp

    w = torch.arange(6.0).reshape(2, 3)
    state = {"state_dict": {"model.w": w},
             "optimizer_0": {"state": {"model.w": {"exp_avg": w * 2, "step": torch.tensor(3.0)}},
                             "param_groups": [{"lr": 0.1, "params": ["model.w"]}]}}  # fmt: skip
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    meta = {"global_step": 3, "loops": {}, "lr_schedulers": [], "epoch": 0}
    torch.save(meta, folder / "meta.pt")
    return folder


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_sharded_checkpoint_reads_whole_and_one_carrying_code_is_refused(tmp_path):
    ck = _sharded(tmp_path / "checkpoints" / "step00000003.ckpt")
    got = read_checkpoint(ck, require_training_state=True)
    assert got["global_step"] == 3
    assert torch.equal(got["state_dict"]["model.w"], torch.arange(6.0).reshape(2, 3))
    opt = got["optimizer_states"][0]
    assert torch.equal(opt["state"]["model.w"]["exp_avg"], torch.arange(6.0).reshape(2, 3) * 2)
    assert opt["param_groups"][0]["lr"] == 0.1
    shapes = read_checkpoint(ck, shapes_only=True)["state_dict"]["model.w"]
    assert shapes.shape == (2, 3) and shapes.is_meta

    # DCP unpickles .metadata with plain pickle: the file is checked before that
    marker = tmp_path / "payload-ran"
    (ck / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused: holds Python objects"):
        read_checkpoint(ck)
    from unipred.train.resume_auto import find_resume_checkpoint

    with pytest.raises(CheckpointError, match="refusing to start over it"):
        find_resume_checkpoint(tmp_path)
    assert not marker.exists(), "the payload ran"

    # a torn folder (no index) is damaged, named, and set aside by resume=auto
    ok = _sharded(tmp_path / "checkpoints" / "step00000001.ckpt")
    (tmp_path / "checkpoints" / "last.ckpt").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt" / "meta.pt").write_bytes((ok / "meta.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"missing \.metadata"):
        read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.warns(UserWarning, match="resume=auto"):
        assert find_resume_checkpoint(tmp_path) == ok
    assert (tmp_path / "checkpoints" / "last.ckpt.damaged").is_dir()
    assert (tmp_path / "checkpoints" / "step00000003.ckpt.unsafe").is_dir()
    assert not marker.exists()


def test_a_shard_entry_carrying_code_is_refused_before_it_runs(tmp_path):
    """DCP pickles the non-tensor entries of a shard file (here an optimizer's learning rate)
    and unpickles them with weights_only=False; unipred's loads refuse one naming code."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "step00000001.ckpt"
    state = {"state_dict": {"model.w": torch.ones(2)},
             "optimizer_0": {"state": {}, "param_groups": [{"lr": _Payload(marker)}]}}  # fmt: skip
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"global_step": 1, "loops": {}, "lr_schedulers": [], "epoch": 0}, folder / "meta.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"'optimizer_0.param_groups.0.lr' of a shard"):
        read_checkpoint(folder)
    assert not marker.exists(), "the payload ran"
    # a shard file cut short: damaged, in one line (DCP raises a BaseException)
    ok = _sharded(tmp_path / "step00000002.ckpt")
    shard = next(ok.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(
        CheckpointError, match=r"shard could not be read|of a shard file is damaged"
    ):
        read_checkpoint(ok)


def test_the_sharded_ema_is_the_emas_arithmetic_on_the_slices_and_goes_through_dcp(tmp_path):
    import copy

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from unipred.train.callbacks import EMA
    from unipred.train.sharded import EMA_KEY, dcp_load
    from unipred.train.sharded_ema import ShardedEMA

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3)
        )
        model = copy.deepcopy(ref)
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded, plain = ShardedEMA(decay=0.9), EMA(decay=0.9)
        plain._average_model = AveragedModel(ref, use_buffers=True,
                                             multi_avg_fn=get_ema_multi_avg_fn(0.9))  # fmt: skip
        assert type(model.state_dict()["0.weight"]).__name__ == "DTensor"
        for _ in range(4):  # the same steps on both models, then one EMA update each
            with torch.no_grad():
                for p, q in zip(model.parameters(), ref.parameters()):
                    step = torch.randn(q.shape)
                    q.add_(step)
                    p.to_local().add_(step)
            sharded._update(model)
            plain._update(ref)
        want = plain._average_model.module.state_dict()
        got = sharded.tensors
        assert got.keys() == want.keys() and sharded._count() == 4
        assert type(got["0.weight"]).__name__ == "DTensor"  # sharded like the weights
        for k, v in want.items():
            assert torch.equal(got[k].full_tensor(), v), k
        assert not torch.equal(want["0.weight"], ref.state_dict()["0.weight"])

        # through a DCP folder into a fresh EMA's (zero) tensors, as a resume reads it
        dcp.save({EMA_KEY: got}, checkpoint_id=str(tmp_path / "ck"))
        again = ShardedEMA(decay=0.9)
        assert float(again.state(model)["0.weight"].full_tensor().abs().sum()) == 0
        dcp_load({EMA_KEY: again.state(model)}, tmp_path / "ck")
        for k, v in want.items():
            assert torch.equal(again.tensors[k].full_tensor(), v), k
    finally:
        dist.destroy_process_group()
