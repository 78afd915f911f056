"""A held-out video set for tuning checks: moving shapes in 8 directions instead of 4.

    python benchmarks/motion_clips.py OUT [--directions 8] [--seed 1] [--pretrain 2048]
                                          [--train-per-class 32] [--test-per-class 64]

The clips of ``unipred demo video``'s motion-direction task (``moving_shape_clip``: a shape
moving over 16 frames of 32 px with a static distractor, written as mp4), with the diagonals as
four more classes and another seed. ``OUT/pretrain/`` holds unlabelled clips for pretraining,
``OUT/motion/train/<direction>/`` the labelled pool and ``OUT/motion/val/<direction>/`` the test
clips. A variant of the demo's generator, not independent data (docs/demos.md, "Video: the
small-data objective").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from unipred.tasks.video.demo import Plan, write_moving
from unipred.tasks.video.tasks import DIRECTIONS


def write(out: Path, directions: int, seed: int, pretrain: int, train: int, test: int) -> Path:
    if not 2 <= directions <= len(DIRECTIONS):
        raise SystemExit(f"--directions {directions}: choose 2 to {len(DIRECTIONS)}")
    plan = Plan(pretrain_clips=pretrain, train_per_class=train, val_per_class=test)
    write_moving(out, plan, seed, n_cls=directions)  # the demo's writer, more directions
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/motion_clips.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("out", type=Path)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pretrain", type=int, default=2048)
    p.add_argument("--train-per-class", type=int, default=32)
    p.add_argument("--test-per-class", type=int, default=64)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors
    print(write(a.out, a.directions, a.seed, a.pretrain, a.train_per_class, a.test_per_class))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
