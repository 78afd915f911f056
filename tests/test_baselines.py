"""Baselines beside every evaluation: random-init backbone, raw input, the source's own."""

from __future__ import annotations

from unipred.task import DataSource


def test_a_data_source_has_no_modality_baselines_by_default():
    src = DataSource(cfg=None, objective="classify")
    assert src.baseline_scores([(0, 1)], [(0, 1)]) == {}
