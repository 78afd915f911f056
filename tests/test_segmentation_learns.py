"""The segmentation model learns: generated scenes (textured shapes with known masks on
textured backgrounds), a tiny NEPA + UperNet trained on CPU, mIoU far above chance."""

import pytest
import torch
from unipred.tasks.image.seg_data import SyntheticScenes
from unipred.tasks.image.segmentation import SegHeadConfig, SegmentationModel

from unipred.task.seg_metrics import segmentation_metrics

SIZE, BATCH, N_VAL = 32, 8, 64


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine this is the fastest and repeatable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_and_eval(steps: int, lr: float = 4e-3, seed: int = 0) -> tuple[float, float]:
    """-> (mIoU of the trained model, mIoU of always predicting the most frequent class)."""
    torch.manual_seed(seed)
    head = SegHeadConfig(layers=[0, 1, 2, 3], channels=16, aux_channels=8)
    model = SegmentationModel.from_name("nepa_debug", head, 4, depth=4, causal=False)
    train = SyntheticScenes(steps * BATCH, SIZE, seed=seed)
    val = SyntheticScenes(N_VAL, SIZE, seed=seed + 7919)  # scenes never seen in training
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warm = max(1, steps // 15)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * (1 - t / steps)
    )
    model.train()
    for x, y in loader:
        loss, _ = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    x, y = map(torch.stack, zip(*(val[i] for i in range(N_VAL))))
    trained, majority = segmentation_metrics(4), segmentation_metrics(4)
    trained.update(model.predict(x, mode="slide", crop=SIZE, stride=SIZE), y)
    majority.update(torch.full_like(y, int(torch.bincount(y.flatten()).argmax())), y)
    return float(trained.compute()["val/mIoU"]), float(majority.compute()["val/mIoU"])


def test_learns_quickly(one_thread):
    # 150 steps sufficed under torch 2.11 (mIoU > 0.45); under the locked torch 2.14 the same
    # run reached 0.39-0.63 over seeds 0-2, and 250 steps reach 0.65 (seed 0)
    miou, chance = train_and_eval(steps=250)
    print(f"250 steps: mIoU {miou:.3f} (most-frequent-class baseline {chance:.3f})")
    assert chance < 0.3
    assert miou > max(0.45, 2 * chance)


@pytest.mark.slow
def test_learns_well(one_thread):
    miou, chance = train_and_eval(steps=400)
    print(f"400 steps: mIoU {miou:.3f} (most-frequent-class baseline {chance:.3f})")
    assert miou > 0.6 and miou > 2.5 * chance
