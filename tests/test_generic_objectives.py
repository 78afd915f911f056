"""The objectives are written once and work on every modality's data source: each registered
``<data>_classify`` task is the shipped ``ClassifyTask`` bound to a ``DataSource``, and its
linear probe (``data.mode=probe``) freezes the backbone, runs it in eval mode and computes
each training sample's feature once, whatever the tokenizer (image, Fashion-MNIST, audio,
video, generated shapes)."""

import pytest
import torch

from unipred import DATASETS, TASKS, ClassifyTask, DataSource, PretrainTask
from unipred.train.config import ConfigError, load_config


def _classify_tasks() -> list[str]:
    return [n for n in TASKS.names() if getattr(TASKS.get(n), "data_class", None) is not None
            and issubclass(TASKS.get(n), ClassifyTask)]  # fmt: skip


def _cfg(name: str, *over: str):
    smoke = TASKS.get(name).smoke_config()
    args = [f"task={name}", *(f"{k}={v}" for k, v in smoke.items()), "trainer.accelerator=cpu"]
    return load_config(None, [*args, *over])


def test_every_data_source_makes_the_generic_tasks():
    from unipred.task.segment import SegmentTask

    names = DATASETS.names()
    assert {"image", "fmnist", "audio", "video", "debug_image", "ade20k"} <= set(names)
    bases = {"pretrain": PretrainTask, "classify": ClassifyTask, "segment": SegmentTask}
    for data in names:
        source = DATASETS.get(data)
        assert source.tasks, data
        for objective, task in source.tasks.items():
            assert TASKS.get(_name_of(task)) is task
            assert issubclass(task, bases[objective]) and task.data_class is source
            # nothing but the binding: the objective's methods are the shipped ones
            for method in ("training_step", "build_dataset", "collate_fn", "build_model"):
                assert method not in vars(task), (data, method)
    for data in ("image", "fmnist", "audio", "video", "debug_image"):
        assert {"pretrain", "classify"} <= set(DATASETS.get(data).tasks), data
    assert "segment" in DATASETS.get("debug_image").tasks
    assert DATASETS.get("ade20k").tasks["segment"] is TASKS.get("segment_ade20k")


def _name_of(task) -> str:
    return next(n for n in TASKS.names() if TASKS.get(n) is task)


@pytest.mark.parametrize("name", _classify_tasks())
def test_linear_probe_is_one_mechanism_for_every_modality(name):
    cfg = _cfg(name, "data.mode=probe", "data.val_root=''")
    task = TASKS.get(name)(cfg)
    model = task.build_model()
    assert type(model.head).__name__ == "LinearProbeHead"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.classifier.weight", "head.classifier.bias"}, trainable
    loader = torch.utils.data.DataLoader(
        task.build_dataset("train"), batch_size=2, collate_fn=task.collate_fn("train")
    )
    batch = next(iter(loader))
    assert len(batch) == 3 and batch[2].dtype == torch.long  # sample keys for the cache
    calls = []
    model.tokenizer.register_forward_hook(lambda *a: calls.append(1))
    model.train()  # as Lightning leaves it: the probe must still see eval-mode features
    loss1, _ = task.training_step(model, batch)
    assert not model.tokenizer.training and not model.predictor.training
    loss1.backward()
    loss2, _ = task.training_step(model, batch)
    assert len(calls) == 1  # the second step read the cached features
    torch.testing.assert_close(loss1.detach(), loss2.detach())
    assert model.head.classifier.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


def test_uncached_probe_recomputes_features_without_keys():
    cfg = _cfg("debug_image_classify", "data.mode=probe", "data.cache_features=false")
    task = TASKS.get("debug_image_classify")(cfg)
    collate = task.collate_fn("train") or torch.utils.data.default_collate
    batch = collate([task.build_dataset("train")[i] for i in range(2)])
    assert len(batch) == 2  # (images, labels): no cache keys
    model = task.build_model()
    calls = []
    model.tokenizer.register_forward_hook(lambda *a: calls.append(1))
    task.training_step(model, batch)
    task.training_step(model, batch)
    assert len(calls) == 2


def test_head_probe_alone_means_the_probe_and_a_conflicting_head_is_refused():
    task = TASKS.get("debug_image_classify")(_cfg("debug_image_classify", "model.head=probe"))
    assert task.mode == "probe"
    with pytest.raises(ConfigError, match="data.mode=probe"):
        _cfg("debug_image_classify", "data.mode=probe", "model.head=mean")
    with pytest.raises(ConfigError, match="data.mode"):
        _cfg("debug_image_classify", "data.mode=zeroshot")


def test_num_classes_precedence_is_decided_once():
    name = "debug_image_classify"
    assert TASKS.get(name)(_cfg(name)).num_classes() == 4  # the data source's count
    assert TASKS.get(name)(_cfg(name, "model.num_classes=6")).num_classes() == 6
    # one source of truth: two keys that disagree are one line at config time
    with pytest.raises(ConfigError, match=r"data.num_classes=5 \(command line\) but model"):
        _cfg(name, "model.num_classes=6", "data.num_classes=5")
    both = _cfg(name, "model.num_classes=5", "data.num_classes=5")
    assert TASKS.get(name)(both).num_classes() == 5


def test_a_data_source_missing_build_fails_at_registration():
    from unipred.base.contracts import ContractError
    from unipred.task import register_data

    with pytest.raises(ContractError, match=r"lacks build\(split, augment\)"):

        @register_data("no_build_here")
        class NoBuild(DataSource):
            pass

    assert "no_build_here_pretrain" not in TASKS.names()


def test_repeats_are_fresh_augmentations_and_features_read_one_pass():
    name = "debug_image_classify"
    over = ("data.labels_per_class=2", "data.repeat=3", "data.train_samples=64")
    finetune = TASKS.get(name)(_cfg(name, *over))
    assert len(finetune.build_dataset("train")) == 4 * 2 * 3  # 4 classes x 2 labels x 3 passes
    ds, _ = finetune.feature_dataset("train")
    assert len(ds) == 4 * 2  # the label subset, once
    probe = TASKS.get(name)(_cfg(name, *over, "data.mode=probe"))
    assert len(probe.build_dataset("train")) == 4 * 2  # cached features: one pass
    fm = TASKS.get("fmnist_classify")(_cfg("fmnist_classify", *over, "data.generated_samples=100"))
    assert (
        len(fm.build_dataset("train")) == 10 * 2 * 3 and len(fm.feature_dataset("train")[0]) == 20
    )
