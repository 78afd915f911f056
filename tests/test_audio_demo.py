"""`unipred demo audio` end to end on a tiny plan (synthesis, pretraining, paired fine-tuning)."""

import shutil

import pytest
from unipred.tasks.audio import demo as audio

needs_synth = pytest.mark.skipif(
    shutil.which("espeak-ng") is None and shutil.which("flite") is None,
    reason="neither espeak-ng nor flite is installed (apt-get install -y espeak-ng flite)",
)


@needs_synth
def test_audio_demo_tiny_plan_writes_paired_table(tmp_path, monkeypatch):
    plan = audio.Plan(train_per_class=2, val_per_class=1, pretrain_epochs=1, finetune_epochs=1,
                      labels=(1,), seeds=2)  # fmt: skip
    monkeypatch.setitem(audio.PLANS, "quick", plan)
    assert audio.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| fine-tune, 1 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["10", "10"]  # 1 label x 10 digits; 1 held-out clip x 10 digits
    assert "±" in cells[3] and "±" in cells[4]  # mean ± sd over the 2 seeds
    assert len(cells[5].split(",")) == 2  # one paired difference per seed
    for kind in ("scratch", "nepa"):  # both seeds ran, as separate runs
        assert (tmp_path / f"finetune1_{kind}_seed2").is_dir()
    assert (tmp_path / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    # the frozen protocols, NEPA vs random init vs the raw input, every training clip labelled,
    # through the probe recipe's read-out (its eval_defaults: a 2-cell grid over time)
    assert "| protocol | NEPA | random init | raw input | raw input, flattened |" in table
    assert "read the probe recipe's grid 2 per axis of the final norm" in table
    for label, n in (("kNN (k=20, T=0.07)", 4), ("linear probe", 4), ("attentive probe", 2),
                     ("per-layer probe", 2)):  # fmt: skip
        row = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
        assert row.count("%") == n, row


def test_table_reports_mean_sd_and_paired_differences():
    table = audio._table([(10, [0.70, 0.74], [0.80, 0.82])], audio.Plan(seeds=2), 400, 60.0)
    assert "72.0% ± 2.8" in table and "81.0% ± 1.4" in table and "+10.0, +8.0" in table


def test_every_digit_is_spoken_by_every_voice_of_its_split():
    from unipred.tasks.audio.spoken_digits import DIGITS, voice_index

    for n_voices, per_class in ((90, 200), (34, 40), (92, 92)):  # the demo's splits and a spare
        for label in range(len(DIGITS)):
            assert {voice_index(i, label, n_voices) for i in range(per_class)} == set(
                range(n_voices)
            )
