"""`unipred visualize`: attention / next-embedding prediction maps and the PNGs they make."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from unipred.tasks.image.visualize import main, maps

from unipred.nn.model import NEPA
from unipred.train.config import load_config, to_dict

FIX = Path(__file__).parent / "fixtures" / "nepa_ref"


def _official_folder(tmp_path):
    meta = json.loads((FIX / "meta.json").read_text())
    d = tmp_path / "pretrain"
    d.mkdir()
    hf = dict(meta["pretrain_model"]["config_full"], architectures=["ViTNepaForPreTraining"])
    (d / "config.json").write_text(json.dumps(hf))
    shutil.copy(FIX / "pretrain_model.safetensors", d / "model.safetensors")
    return d


def test_prediction_map_matches_the_official_outputs(tmp_path):
    from unipred.weights.hub import load_official_nepa

    model = load_official_nepa(_official_folder(tmp_path)).eval()
    io = load_file(str(FIX / "io.safetensors"))
    x, hidden, inputs = (
        io["pixel_values"][1],
        io["last_hidden_state_causal"][1],
        io["input_embedding"][1],
    )
    for p in (0, 5, 15):
        want = torch.nn.functional.cosine_similarity(hidden[1 + p][None], inputs[1:], dim=-1)
        m = maps(model, x, p)
        np.testing.assert_allclose(m["prediction"].ravel(), want.softmax(0).numpy(), atol=1e-5)
        assert m["grid"] == (4, 4)


def test_attention_map_is_causal_and_top_p_filters():
    torch.manual_seed(0)
    model = NEPA.from_name("nepa_debug").eval()
    x = torch.randn(3, 32, 32)
    m = maps(model, x, 10)
    att = m["attention"].ravel()
    assert att.shape == (64,) and np.all(att[11:] == 0) and att[:11].sum() > 0
    assert att.sum() <= 1 + 1e-5  # the cls column is dropped
    assert m["prediction"].sum() == pytest.approx(1, abs=1e-5)
    filtered = maps(model, x, 10, layers=[1], top_p=0.3)["prediction"]
    assert filtered.sum() == pytest.approx(1, abs=1e-5) and (filtered > 0).sum() < 64
    with pytest.raises(ValueError, match="patch grid"):
        maps(model, x, 64)


def test_cli_writes_pngs_for_random_official_and_our_checkpoints(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        img / "a.jpg"
    )
    out = tmp_path / "out"
    assert (
        main(
            ["--model", "nepa_debug", "--size", "32", "--num-images", "2", "--out", str(out / "r")]
        )
        == 0
    )
    assert (
        main(
            [
                "--official",
                str(_official_folder(tmp_path)),
                "--size",
                "56",
                str(img),
                "--out",
                str(out / "o"),
                "--patch",
                "3",
            ]
        )
        == 0
    )
    cfg = load_config(None, ["task=image_pretrain", "model.name=nepa_debug"], check_paths=False)
    model = NEPA.from_name("nepa_debug")
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "unipred_config": to_dict(cfg),
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    assert (
        main(
            [
                "--ckpt",
                str(tmp_path / "m.ckpt"),
                "--size",
                "32",
                str(img / "a.jpg"),
                "--out",
                str(out / "c"),
            ]
        )
        == 0
    )
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert [p.split("/")[0] for p in pngs] == ["c", "o", "r", "r"] and "o/a_p3.png" in pngs
    for p in out.rglob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 400
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--ema", "--out", str(out / "x")]) == 2


def test_checkpoint_maps_use_the_training_size_by_default(tmp_path, capsys):
    cfg = load_config(
        None,
        ["task=image_pretrain", "model.name=nepa_debug", "data.aug.img_size=24"],
        check_paths=False,
    )
    model = NEPA.from_name("nepa_debug")
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "unipred_config": to_dict(cfg),
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    args = ["--ckpt", str(tmp_path / "m.ckpt"), "--num-images", "1", "--patch", "35"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    # 24 px with patch 4 is a 6 x 6 grid: patch 35 is the last one; at 224 px it would be 56 x 56
    capsys.readouterr()
    assert main([*args, "--patch", "36", "--out", str(tmp_path / "b")]) == 2
    assert "--patch 36 is outside the 6x6 patch grid" in capsys.readouterr().err


def test_a_grey_checkpoint_reads_the_images_grey(tmp_path):
    """The small-image recipe trains on grey folders with a 1-channel tokenizer (in_chans read
    from the data): visualize read every image as RGB and stopped with "ImageTokenizer expects
    (B, 1, H, W) images, got (1, 3, ...)"."""
    from unipred.base.registry import TASKS

    over = ["task=image_pretrain", "model.name=nepa_debug", "model.tokenizer_args.in_chans=1",
            "data.aug.img_size=24", "data.aug.mean=[0.5]", "data.aug.std=[0.5]"]  # fmt: skip
    cfg = load_config(None, over, check_paths=False)
    model = TASKS.get(cfg.task)(cfg).build_model()
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "unipred_config": to_dict(cfg),
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    img = tmp_path / "imgs"
    img.mkdir()
    grey = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    Image.fromarray(grey).save(img / "g.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(img / "rgb.png")  # an RGB file: read grey
    out = tmp_path / "out"
    assert main(["--ckpt", str(tmp_path / "m.ckpt"), str(img), "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 2
