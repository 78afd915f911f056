"""Per-sample seeding is skipped for sets whose samples draw nothing random
(``per_sample_random = False``): the batches must stay bit-identical, and the batch-level
collate (the Fashion-MNIST shift and flip) must stay seeded by its batch."""

import torch
from unipred.tasks.image.fashion_mnist import ArrayImages

import unipred.data.seeding as seeding
from unipred.base.registry import TASKS
from unipred.data.loader import build_loader
from unipred.train.config import load_config, packaged_configs


def _batches(monkeypatch, per_sample_random: bool) -> tuple[list, int]:
    monkeypatch.setattr(ArrayImages, "per_sample_random", per_sample_random)
    seeds = []
    real = seeding.sample_seed
    monkeypatch.setattr(seeding, "sample_seed", lambda *k: seeds.append(k) or real(*k))
    cfg = load_config(packaged_configs() / "demo" / "fmnist_pretrain.yaml",
                      ["data.root=''", "data.generated_samples=64"], check_paths=False)  # fmt: skip
    task = TASKS.get(cfg.task)(cfg)
    loader = build_loader(task.build_dataset("train"), 16, 1, 0, 1, cfg.seed, True, 0,
                          task.collate_fn("train"))  # fmt: skip
    out = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        out += [b[0].clone() for b in loader]
    return out, len(seeds)


def test_unseeded_sample_reads_give_the_same_augmented_batches(monkeypatch):
    slow, slow_seeds = _batches(monkeypatch, True)
    fast, fast_seeds = _batches(monkeypatch, False)
    assert len(fast) == len(slow) == 8
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    assert not torch.equal(fast[0], fast[4])  # epoch 1 augments differently
    assert fast_seeds == 8  # one seed per batch (its collate), none per sample
    assert slow_seeds == 8 + 8 * 16


def test_sets_that_do_not_say_so_are_still_seeded_per_sample():
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(())

    ds = seeding.SeededDataset(Draws(), seed=3)
    a = ds.__getitems__([(0, 1), (0, 2)])
    b = ds.__getitems__([(0, 1), (0, 2)])
    assert torch.equal(torch.stack(a), torch.stack(b)) and a[0] != a[1]
