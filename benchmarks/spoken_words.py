"""A held-out audio set for tuning checks: ten spoken command words instead of digits.

    python benchmarks/spoken_words.py OUT [--train-per-class 150] [--test-per-class 40]
                                          [--seed 1]

The words of Speech Commands' core set ("yes", "no", "up", "down", "left", "right", "on",
"off", "stop", "go"), synthesised exactly as ``unipred demo audio``'s spoken digits
(``unipred.tasks.audio.spoken_digits``: espeak-ng accents and variants plus flite voices,
random rate, pitch, leading silence, gain and noise; test clips only from voices no training
clip uses), from another seed. Recipes tuned on the digits are checked here, on words they
never saw: ``OUT/train/<word>/*.wav`` is the unlabelled pretraining set and the labelled pool,
``OUT/test/<word>/*.wav`` the test set.
"""

from __future__ import annotations

import argparse
import sys

from unipred.tasks.audio import spoken_digits

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/spoken_words.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("out")
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    # the synthesiser speaks DIGITS[label] into a folder named after it: swap in the words
    spoken_digits.DIGITS = WORDS
    out = spoken_digits.synthesize(a.out, a.train_per_class, a.test_per_class, a.seed, a.workers)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
