"""The core's bad-sample counter knows no modality: reasons are registered by the modality that
counts them, travel with a counter to spawned workers, and only reasons that occur are logged."""

import pickle

import pytest

from unipred.data import accounting
from unipred.data.accounting import BadSampleCounter, register_reasons


def test_reasons_are_registered_by_their_modality():
    import unipred.tasks.image.decode  # noqa: F401  (registers the image conversions)

    c = BadSampleCounter()
    c.count("truncated", "a.jpg")  # a core reason
    c.count("cmyk", "b.jpg")  # the image modality's
    with pytest.raises(KeyError, match="register it with register_reasons"):
        c.count("sensor_dropout", "c.csv")
    register_reasons(skipped=("sensor_dropout",))
    c.count("sensor_dropout", "c.csv")
    snap = c.snapshot()
    assert snap["skipped/truncated"] == 1 and snap["converted/cmyk"] == 1
    assert snap["skipped/sensor_dropout"] == 1 and snap["skipped/total"] == 2
    assert snap["converted/total"] == 1


def test_a_pickled_counter_keeps_its_columns_whatever_the_worker_registered_first(monkeypatch):
    from multiprocessing.reduction import ForkingPickler  # how DataLoader workers get it

    import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions)
    import unipred.tasks.image.decode  # noqa: F401

    c = BadSampleCounter()
    blob = bytes(ForkingPickler.dumps(c))
    # a spawned worker that imported modalities in another order has other column numbers
    monkeypatch.setattr(accounting, "_COLUMNS", dict(reversed(list(accounting._COLUMNS.items()))))
    w = pickle.loads(blob)
    w.count("cmyk", "x.jpg")
    w.count("tiny", "y.jpg")
    snap = c.snapshot()  # the parent reads the shared tensor with its own columns
    assert snap["converted/cmyk"] == 1 and snap["skipped/tiny"] == 1 and snap["skipped/total"] == 1


def test_a_book_built_under_inference_mode_resets_and_records_outside_it():
    """An `evaluate` in the same process builds its readers under inference mode; a later run's
    reset (COUNTER.reset, begin_run) zeroes their books outside it (was a RuntimeError)."""
    import torch

    from unipred.data.accounting import COUNTER
    from unipred.data.book import SampleBook

    with torch.inference_mode():
        book = SampleBook(["a.png", "b.png"], "test")
    assert not book.marks.is_inference() and not book.bad.is_inference()
    book.reset()
    COUNTER.reset()
