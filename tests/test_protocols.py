"""Evaluation protocols (unipred/protocols.py): kNN, linear, attentive, per-layer; the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch

from unipred.nn.heads import pool_tokens
from unipred.nn.model import NEPA
from unipred.protocols import (
    AttentiveProbe,
    AttentiveSettings,
    Features,
    KNNSettings,
    ProbeSettings,
    ProtocolError,
    extract_features,
    knn_classify,
    parse_eval_settings,
    run_attentive,
    run_knn,
    run_layers,
    run_linear,
    split_eval_args,
)


def _clusters(n, d=16, c=4, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 2
    y = torch.arange(n) % c
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def test_knn_matches_a_per_sample_computation():
    g = torch.Generator().manual_seed(1)
    tr, ty = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g)
    te = torch.randn(7, 8, generator=g)
    scores = knn_classify(tr, ty, te, 3, k=5, temperature=0.1, chunk=3)
    for i in range(7):  # cosine to every training sample, five nearest vote exp(sim / T)
        sims = torch.stack([torch.cosine_similarity(te[i], t, dim=0) for t in tr])
        top = sims.argsort(descending=True)[:5]
        want = torch.zeros(3)
        for j in top:
            want[ty[j]] += torch.exp(sims[j] / 0.1)
        assert torch.allclose(scores[i], want, rtol=1e-4), i


def test_knn_separates_clusters_and_not_noise():
    x, y = _clusters(400)
    tr, va = Features(x[:300], y[:300]), Features(x[300:], y[300:])
    assert run_knn(tr, va, 4, KNNSettings())["top1"] == 1.0
    shuffled = Features(x[:300], y[:300][torch.randperm(300)])
    assert run_knn(shuffled, va, 4, KNNSettings())["top1"] < 0.5


def test_linear_probe_learns_a_linear_rule():
    x, y = _clusters(600, noise=1.0)
    tr, va = Features(x[:500], y[:500]), Features(x[500:], y[500:])
    r = run_linear(tr, va, 4, ProbeSettings(epochs=15, batch=100))
    assert r["top1"] > 0.9
    bad = run_linear(Features(x[:500], y[:500][torch.randperm(500)]), va, 4,
                     ProbeSettings(epochs=15, batch=100))  # fmt: skip
    assert bad["top1"] < 0.5


def test_layer_sweep_names_the_informative_layer():
    x, y = _clusters(600, noise=0.5)
    layers = torch.randn(4, 600, 16)
    layers[2] = x  # only block 2 carries the class
    tr = Features(x[:500], y[:500], layers=layers[:, :500])
    va = Features(x[500:], y[500:], layers=layers[:, 500:])
    r = run_layers(tr, va, 4, ProbeSettings(epochs=20, batch=100))
    assert r["best_layer"] == "block 2" and r["top1"] > 0.9
    assert list(r["per_layer"]) == ["block 0", "block 1", "block 2", "final norm"]
    assert all(v["top1"] < 0.5 for k, v in r["per_layer"].items() if k != "block 2")


def test_attentive_probe_ignores_padding_and_learns():
    torch.manual_seed(0)
    p = AttentiveProbe(16, 3, heads=4).eval()
    t = torch.randn(2, 5, 16)
    padded = torch.cat([t, 100 * torch.randn(2, 3, 16)], dim=1)
    valid = torch.tensor([[True] * 5 + [False] * 3] * 2)
    assert torch.allclose(p(t), p(padded, valid), atol=1e-5)
    # the class sits in one token among noise tokens, at a random position
    n, y = 600, torch.arange(600) % 3
    g = torch.Generator().manual_seed(0)
    toks = torch.randn(n, 6, 16, generator=g)
    pos = torch.randint(0, 6, (n,), generator=g)
    toks[torch.arange(n), pos] = 4 * torch.nn.functional.one_hot(y, 16).float() + 2.0
    tr = Features(toks[:500].mean(1), y[:500], tokens=toks[:500])
    va = Features(toks[500:].mean(1), y[500:], tokens=toks[500:])
    r = run_attentive(tr, va, 3, AttentiveSettings(epochs=15, batch=50, lr=3e-3), heads=4)
    assert r["top1"] > 0.9


@pytest.mark.parametrize("masked", [False, True])
def test_attentive_pool_is_the_reference_attention(masked):
    """The pooled query (projections moved past the softmax) equals V-JEPA's written form,
    keys and values of every token and SDPA, and so do the gradients of the tokens and of
    every parameter (non-zero biases: the key bias must cancel, the value bias must not);
    a wrong head layout or a dropped bias fails it."""
    torch.manual_seed(0)
    p = AttentiveProbe(32, 5, heads=4)
    for m in p.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.bias, std=0.3)
    t = torch.randn(6, 7, 32, requires_grad=True)
    valid = (torch.rand(6, 7) > 0.4) | (torch.arange(7) == 0) if masked else None
    w = torch.randn(6, 32)
    got = []
    for pool in (p.pool, p.pool_reference):
        p.zero_grad()
        t.grad = None
        out = pool(t, valid)
        (out * w).sum().backward()
        grads = {n: q.grad.clone() for n, q in p.named_parameters() if q.grad is not None}
        got.append((out.detach(), t.grad.clone(), grads))
    (o1, g1, p1), (o2, g2, p2) = got
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    assert p1.keys() == p2.keys() and "kv.bias" in p1 and "kv.weight" in p1
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-5, atol=1e-6, msg=n)


def test_features_are_the_frozen_backbones_in_eval_mode():
    torch.manual_seed(0)
    model = NEPA.from_name(
        "nepa_debug", drop_path=0.5, tokenizer_args={"patch_size": 4, "in_chans": 1}
    )
    model.train()
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6) % 2
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    f = extract_features(model, batches, layers=True, tokens=True)
    assert not model.training
    with torch.no_grad():
        out = model.forward_features(x, layers=(0, 1))
    want = pool_tokens(out.hidden, 1, None, "mean")
    assert torch.allclose(f.pooled, want, atol=1e-5) and torch.equal(f.labels, y)
    assert f.layers.shape == (3, 6, 64)  # two blocks + final norm
    assert torch.allclose(f.layers[0], pool_tokens(out.layers[0], 1, None, "mean"), atol=1e-5)
    assert torch.allclose(f.layers[-1], f.pooled)
    assert f.tokens.shape == (6, 16, 64) and f.valid is None  # 16 patches, cls dropped
    again = extract_features(model, batches)
    assert torch.equal(again.pooled, f.pooled)  # deterministic: no drop path, no RoPE jitter


def test_eval_settings_are_checked():
    mine, rest = split_eval_args(["protocol=knn", "ema=both", "ema.enabled=false", "knn.k=5",
                                  "model.name=x", "protocols=knn,layers"])  # fmt: skip
    assert rest == ["ema.enabled=false", "model.name=x"]
    s = parse_eval_settings(mine)
    assert (s.protocol, s.ema, s.knn.k, s.protocols) == ("knn", "both", 5, ["knn", "layers"])
    with pytest.raises(ProtocolError, match="knn.kk"):
        parse_eval_settings(["knn.kk=3"])
    with pytest.raises(ProtocolError, match="'probe' is not one of"):
        parse_eval_settings(["protocol=probe"])
    with pytest.raises(ProtocolError, match="ema='maybe'"):
        parse_eval_settings(["ema=maybe"])


def test_cli_names_a_bad_eval_setting(capsys):
    from unipred.cli import main

    rc = main(["eval", "configs/demo/fmnist_probe.yaml", "ckpt=x.ckpt", "protocol=knn", "knn.kk=3"])
    assert rc == 2 and "knn.kk" in capsys.readouterr().err
    rc = main(["evaluate-suite", "configs/demo/fmnist_probe.yaml", "protocols=knn,probe"])
    assert rc == 2 and "'probe' is not one of" in capsys.readouterr().err


# eval_defaults.features.block=null: the recipe reads block 3 of the demo model's 6; this model has 2
TINY = ["model.predictor.dim=32", "model.predictor.depth=2", "model.predictor.heads=2", "eval_defaults.features.block=null",
        "data.root=''", "data.generated_samples=48", "trainer.progress_bar=false",
        "trainer.precision=32-true"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from unipred.cli import main

    run = tmp_path_factory.mktemp("pre")
    rc = main(["fit", "configs/demo/fmnist_pretrain.yaml", f"run_dir={run}", *TINY,
               "trainer.max_steps=3", "trainer.global_batch=16", "ema.enabled=true",
               "trainer.loggers=[]"])  # fmt: skip
    assert rc == 0
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.slow  # a 3-step pretraining run, then every protocol on raw and EMA (~25 s)
def test_evaluate_suite_writes_the_table(tiny_ckpt, capsys):
    from unipred.cli import main

    rc = main(["evaluate-suite", "configs/demo/fmnist_probe.yaml", f"ckpt={tiny_ckpt}", *TINY,
               "linear.epochs=2", "attentive.epochs=1", "layers.epochs=2"])  # fmt: skip
    assert rc == 0
    folder = tiny_ckpt.parent.parent / "eval"
    res = json.loads((folder / "results.json").read_text())
    got = [(r["protocol"], r["weights"]) for r in res["rows"]]
    want = [(p, w) for w in ("raw", "ema", "random") for p in ("knn", "linear", "attentive",
                                                               "layers")]  # fmt: skip
    assert got == want + [
        ("knn", "input"),
        ("linear", "input"),
        ("knn", "input_flat"),
        ("linear", "input_flat"),
    ]  # the baselines follow
    assert all(0.0 <= r["top1_pct"] <= r["top5_pct"] <= 100.0 for r in res["rows"])
    layers = next(r for r in res["rows"] if r["protocol"] == "layers")["per_layer"]
    assert all(set(acc) == {"top1_pct", "top5_pct"} for acc in layers.values())
    md = (folder / "results.md").read_text()
    assert "| knn | raw |" in md and "Per-layer probe (ema weights)" in md
    out = capsys.readouterr().out
    assert "<- best" in out and "final norm" in out
    # the export's model card carries this table (EMA rows for the EMA weights)
    from unipred.nn.model import NEPA
    from unipred.train.checkpoint import read_checkpoint

    assert main(["export", str(tiny_ckpt), str(folder / "hf"), "--ema"]) == 0
    card = (folder / "hf" / "README.md").read_text()
    assert "| knn | ema |" in card and "| knn | raw |" not in card
    assert "| knn | random |" in card and "| linear | input |" in card
    assert "task: fmnist_pretrain" in card and "| total_steps | 3 |" in card
    ema = read_checkpoint(tiny_ckpt)["ema_state_dict"]
    back = NEPA.from_pretrained(folder / "hf")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ema.items())


@pytest.mark.slow
def test_eval_protocol_and_ema_switch(tiny_ckpt, capsys):
    from unipred.cli import main

    rc = main(["eval", "configs/demo/fmnist_probe.yaml", f"ckpt={tiny_ckpt}", *TINY,
               "protocol=knn", "ema=false"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "knn        raw" in out and " ema " not in out
    # fine-tuning "as today": the config's training run from the EMA backbone
    run = tiny_ckpt.parent.parent / "ft"
    rc = main(["eval", "configs/demo/fmnist_finetune.yaml", f"ckpt={tiny_ckpt}", *TINY,
               "protocol=finetune", "ema=true", f"run_dir={run}", "data.labels_per_class=2",
               "data.repeat=1", "trainer.global_batch=4", "trainer.max_steps=2",
               "trainer.loggers=[]"])  # fmt: skip
    out = capsys.readouterr().out
    # the name column is as wide as the longest row name (input_flat): match the words
    assert rc == 0 and re.search(r"^finetune +ema +top-1", out, re.M) and "nan" not in out
    assert re.search(r"^finetune +random +top-1", out, re.M)  # the scratch baseline beside it
    assert (run / "finetune_ema" / "checkpoints" / "last.ckpt").exists()


def test_random_init_baseline_is_the_seeded_untrained_model(tmp_path, capsys):
    """ckpt=random: the config's model at its init, the same for the same seed, no load."""
    from unipred.cli import main
    from unipred.protocols import frozen_eval, weight_sets
    from unipred.train.config import load_config

    assert weight_sets("random", "both") == [("random", None)]
    with pytest.raises(ProtocolError, match="no EMA"):
        weight_sets("random", "true")
    cfg_args = [*TINY, "trainer.accelerator=cpu"]
    runs = [frozen_eval("configs/demo/fmnist_probe.yaml", [*cfg_args, f"seed={s}"], "random",
                        ("knn", "linear"), ["linear.epochs=2"], log=lambda *_: None)
            for s in (0, 0, 1)]  # fmt: skip
    assert [r["weights"] for r in runs[0]] == ["random", "random"]
    assert runs[0] == [dict(r, seconds=a["seconds"]) for r, a in zip(runs[1], runs[0])]
    assert runs[2][0]["top1"] != runs[0][0]["top1"] or runs[2][1]["top1"] != runs[0][1]["top1"]
    # the config check accepts it; evaluate-suite needs a folder for the results
    assert load_config("configs/demo/fmnist_probe.yaml", [*TINY, "ckpt=random"]).ckpt == "random"
    rc = main(["evaluate-suite", "configs/demo/fmnist_probe.yaml", "ckpt=random", *TINY])
    assert rc == 2 and "give out=DIR" in capsys.readouterr().err
    rc = main(["evaluate-suite", "configs/demo/fmnist_probe.yaml", "ckpt=random", *TINY,
               "protocols=knn", f"out={tmp_path}"])  # fmt: skip
    assert rc == 0 and "| knn | random |" in (tmp_path / "results.md").read_text()


def test_features_can_come_from_a_middle_block():
    """features.block=i pools block i's output (before the final norm) for k-NN and linear."""
    torch.manual_seed(0)
    model = NEPA.from_name("nepa_debug", depth=3)
    x = torch.randn(4, 3, 28, 28)
    batches = [(x, torch.tensor([0, 1, 0, 1]))]
    f = extract_features(model, batches, block=1)
    out = model.forward_features(x, layers=(1,))
    assert torch.allclose(f.pooled, pool_tokens(out.layers[0], 1, None, "mean"), atol=1e-5)
    assert torch.allclose(extract_features(model, batches, block=-2).pooled, f.pooled)
    with pytest.raises(ProtocolError, match="features.block=3: the backbone has 3 blocks"):
        extract_features(model, batches, block=3)


def test_the_suite_report_and_the_model_card_print_one_rows_table():
    from unipred.protocols.report import results_markdown
    from unipred.weights.pretrained import model_card

    rows = [{"protocol": "knn", "weights": "raw", "top1": 0.5, "top5": 0.9, "seconds": 1.25,
             "k": 20, "temperature": 0.07},
            {"protocol": "linear", "weights": "ema", "top1": 0.625, "top5": None, "seconds": 2.0,
             "epochs": 3, "lr": 0.1}]  # fmt: skip
    report = results_markdown({"meta": {"config": "c.yaml", "task": "t"}, "rows": rows})
    assert "| protocol | weights | top-1 | top-5 | details | seconds |" in report
    assert "| knn | raw | 50.00 % | 90.00 % | k=20, T=0.07 | 1.2 |" in report
    from unipred import NEPA
    from unipred.weights.pretrained import config_to_dict

    model = NEPA.from_name("nepa_debug")
    card = model_card(model, config_to_dict(model.cfg), evaluation={"rows": rows})
    assert "| protocol | weights | top-1 | top-5 | details |\n" in card
    assert "| linear | ema | 62.50 % | - | 3 epochs, lr 0.1 |\n" in card


def test_results_files_hold_percent_and_read_back_as_fractions(tmp_path):
    """results.json / eval/<protocol>.json: every accuracy in percent with the unit in the
    key and in "units"; read_results gives the in-memory fractions from this format and from
    an earlier release's file (fractions under top1 / top5)."""
    from unipred.protocols.report import read_results, with_percent, write_results

    rows = [{"protocol": "layers", "weights": "raw", "top1": 0.375, "top5": 0.9, "seconds": 1.0,
             "best_layer": "block 1", "per_layer": {"block 0": {"top1": 0.25, "top5": 0.5},
                                                    "block 1": {"top1": 0.375, "top5": 0.9}}},
            {"protocol": "char-nb", "weights": "data", "top1": 0.8, "top5": None,
             "seconds": 0.5}]  # fmt: skip
    _, js = write_results({"rows": rows, "meta": {}}, tmp_path)
    saved = json.loads(js.read_text())
    assert saved["units"] == {"top1_pct": "%", "top5_pct": "%"}
    assert "top1" not in json.dumps(saved).replace("top1_pct", "")  # no fraction left
    assert saved["rows"][0]["top1_pct"] == 37.5 and saved["rows"][1]["top5_pct"] is None
    assert saved["rows"][0]["per_layer"]["block 0"] == {"top1_pct": 25.0, "top5_pct": 50.0}
    for data in (js, {"rows": rows}, with_percent({"rows": rows})):  # new file, old, new dict
        back = read_results(data)["rows"]
        assert [r["top1"] for r in back] == [0.375, 0.8] and back[1]["top5"] is None
        assert back[0]["per_layer"]["block 0"]["top1"] == 0.25
