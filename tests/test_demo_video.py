"""`unipred demo video --quick`: the whole demo (clip writing, pretraining, both fine-tunes,
the table) runs end to end on generated clips."""

from unipred.tasks.video.demo import PLANS, main


def test_video_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["--quick", "--no-real", "--threads", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "motion direction" in table and "NEPA-pretrained" in table
    assert f"pretraining: {PLANS['quick'].pretrain_epochs} epochs" in table
    assert (tmp_path / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    # both fine-tunes ran and reported an accuracy in [0, 1]
    row = next(line for line in table.splitlines() if "motion direction" in line)
    accs = [float(c.strip().rstrip("%")) for c in row.strip("|").split("|")[-2:]]
    assert all(0.0 <= a <= 100.0 for a in accs), row
    # the frozen protocols on the same task, NEPA vs random init vs the raw input, through the
    # read-out of video/demo_probe (its eval_defaults: every token, a 4 x 4 x 4 grid), the
    # recipe `unipred eval video/demo_probe` and `unipred compare --probe-config` use
    assert "Frozen backbone, motion direction" in table
    assert "read the recipe's grid 4 per axis of the final norm" in table
    assert "| protocol | NEPA | random init | raw input | raw input, flattened |" in table
    for label, n in (("kNN (k=20, T=0.07)", 4), ("linear probe", 4), ("attentive probe", 2),
                     ("per-layer probe", 2)):  # fmt: skip
        row = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
        assert row.count("%") == n, row
