"""`unipred demo joint --quick`: data, three single-modality pretrainings, the joint one with
their summed steps, nine fine-tunes per seed and the table run end to end (generated images)."""

import json

import pytest
from unipred.tasks.joint.demo import PLANS, main


@pytest.mark.slow
def test_joint_demo_quick_end_to_end(tmp_path):
    from unipred.tasks.audio.spoken_digits import available_engines

    if not available_engines():
        pytest.skip("espeak-ng / flite not installed")
    assert main(["--quick", "--data", "generated", "--threads", "1", "--out", str(tmp_path)]) == 0
    plan = PLANS["quick"]
    steps = {m: json.loads((tmp_path / f"pretrain_{m}" / "recipe.json").read_text())["total_steps"]
             for m in ("image", "audio", "video", "joint")}  # fmt: skip
    assert steps == {"image": plan.image_steps, "audio": plan.audio_steps,
                     "video": plan.video_steps,
                     "joint": plan.image_steps + plan.audio_steps + plan.video_steps}  # fmt: skip
    table = (tmp_path / "results.md").read_text()
    info = json.loads((tmp_path / "results.json").read_text())
    for m in ("image", "audio", "video"):
        for arm in ("scratch", "single", "joint"):
            accs = info["accuracy_pct"][m][arm]
            assert len(accs) == plan.seeds and all(0.0 <= a <= 100.0 for a in accs)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 4  # header + 3 rows
    assert "joint − single, per seed" in table
    # every modality's fine-tune from the joint checkpoint got that modality's tokenizer
    cfg = (tmp_path / "audio_joint_seed1" / "config.yaml").read_text()
    assert "pretrain_joint/checkpoints/last.ckpt@audio" in cfg
    # the single-modality arms train the joint run's objective (the release's), not their
    # recipes' small-data switches: the table compares joint vs single, nothing else
    from omegaconf import OmegaConf

    release = ("cosine", 1, "none", "none", False)
    for m in ("image", "audio", "video", "joint"):
        o = OmegaConf.load(tmp_path / f"pretrain_{m}" / "config.yaml").model.objective
        got = (o.loss, o.horizon, o.head, o.target_norm, o.auto)
        # a key the run's config leaves unset (None) is the release default
        assert all(g in (None, r) for g, r in zip(got, release)), (m, got)
    assert (
        OmegaConf.load(tmp_path / "pretrain_audio" / "config.yaml").model.objective.loss == "cosine"
    )
