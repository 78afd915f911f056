"""``model.objective.auto=true``: the pretraining objective chosen from the data's sizes.

Read from the data before the model is built: the number of training samples (``len`` of the
training set; a streamed set counts as large) and the tokens per sample (the tokenizer run on
the first sample). The choice, and why, is printed in one line. Keys the config sets
explicitly (``model.objective.horizon=3``, ...) are kept. Measured basis (docs/objectives.md,
docs/small-data.md):

* **small data** (< ``SMALL_DATA`` samples): on Fashion-MNIST at 20 px (5,000 images, 25 tokens)
  the release objective's frozen k-NN fell below a random network's; instance-normalised
  targets, an MLP head and a longer horizon fixed it, and fine-tuning beat scratch. The horizon
  is two rows of the token grid (``2 x`` the tokens along the fastest-varying axis of the
  tokenizer's coordinates, 2 to 16, below the token count): horizon 10 on a 5 x 5 grid
  measured above one row (5). A sequence along one axis only (full-band audio tokens: one
  token per time step) has no rows: horizon 3, the spoken digits' measured best. Coordinates
  that do not form a grid fall back to two rows of a square grid of the same token count
  (``2 * round(sqrt(tokens))``). The loss is
  ``infonce_batch`` (every other token of the batch a negative; the audio recipe's, and on
  Fashion-MNIST the best frozen k-NN) when the batch holds at most ``INFONCE_BATCH_TOKENS``
  tokens (its logits are a square of that size); above it, the cosine.
* **large data**: the release objective (the paper's ImageNet recipe), unchanged.
* **discrete tokens** (a tokenizer whose ``discrete`` attribute is true: an embedding table
  over a vocabulary, such as the text tokenizer), at any scale: ``target=patch``, the next
  token's ids through the tokenizer's fixed one-hot view. With a learned table as both input
  and target the release objective has an easy way out; on the word-language set the fixed
  target beat it frozen and fine-tuned (docs/text.md). With it, ``infonce_batch`` under the same
  batch bound as small data: on the word set (tuning) and on man-page lines (held out) the
  batch's other tokens as negatives raised the frozen k-NN and linear probe over the cosine.
  The other small-data keys (head, horizon, target norm) are not added: a horizon of 3 with an
  MLP head measured no better on words, instance-normalised targets worse.

No modality is named here: the tokenizer and the data source give the sizes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

SMALL_DATA = 100_000  # training samples below which the small-data settings are chosen
# every objective key ``choose`` may set: the task writes each back into the run config
CHOSEN_KEYS = ("target", "target_norm", "head", "horizon", "loss")
INFONCE_BATCH_TOKENS = 8192  # batch x tokens up to which infonce_batch is chosen (8192^2 logits)


@dataclasses.dataclass
class DataScale:
    samples: int | None  # None: a streamed set (no length)
    tokens: int  # tokens per sample (the first sample's)
    discrete: bool = False  # the tokenizer embeds ids of a vocabulary (its ``discrete``)
    batch: int = 0  # samples per device batch (0: unknown; infonce_batch is not chosen)
    grid: tuple[int, ...] = ()  # tokens along each axis whose coordinate varies (() unknown)


def _has_len(ds) -> bool:
    try:
        len(ds)
    except TypeError:  # a stream of unknown length
        return False
    return True


def measure(source, tokenizer, batch_size: int = 0) -> DataScale:
    """Sizes of ``source``'s training split: sample count and the first sample's tokens."""
    from torch.utils.data import default_collate

    ds = source.build("train", augment=False)
    if ds is None:
        raise ValueError("model.objective.auto: the data have no training split to read sizes from")
    stream = isinstance(ds, torch.utils.data.IterableDataset)  # shards: a length, no ds[0]
    n = len(ds) if hasattr(ds, "__len__") and not (stream and not _has_len(ds)) else None
    item = next(iter(ds)) if stream else ds[0]
    collate = source.collate("train", False) or default_collate
    batch = collate([item])
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    with torch.no_grad():
        out = tokenizer(x)
    tokens = int(out.tokens.shape[1])
    grid = token_grid(out.coords, out.valid)
    return DataScale(n, tokens, bool(getattr(tokenizer, "discrete", False)), batch_size, grid)


def token_grid(coords: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[int, ...]:
    """Tokens along each axis whose coordinate varies (the axis that varies fastest in token
    order last), when the (real) tokens form a full grid of those sizes; () otherwise.
    ``coords``: (N, k) or (1, N, k) as a tokenizer returns them."""
    c = coords[0] if coords.dim() == 3 else coords
    if valid is not None:
        c = c[valid.reshape(-1)[: c.shape[0]].bool()]
    if c.dim() != 2 or c.shape[0] == 0:
        return ()
    c = c.float().round(decimals=4)
    axes = [a for a in range(c.shape[1]) if torch.unique(c[:, a]).numel() > 1]
    if len(c) > 1:  # the axis that changes from the first token to the second goes last
        fast = [a for a in axes if c[1, a] != c[0, a]]
        axes = [a for a in axes if a not in fast[:1]] + fast[:1]
    grid = tuple(int(torch.unique(c[:, a]).numel()) for a in axes)
    return grid if grid and math.prod(grid) == c.shape[0] else ()


def choose_horizon(scale: DataScale) -> tuple[int, str]:
    """(horizon, how it was read) for small data: two grid rows, 3 on a 1-axis sequence."""
    if len(scale.grid) == 1:
        h, how = 3, "a sequence along one axis: horizon 3"
    elif len(scale.grid) > 1:
        row = scale.grid[-1]
        h = 2 * row
        how = f"a horizon of two rows of the {' x '.join(map(str, scale.grid))} token grid"
    else:
        h = 2 * round(math.sqrt(scale.tokens))
        how = "a horizon of two rows of a square grid"
    return min(16, max(2, h), max(1, scale.tokens - 1)), how


def batch_negatives(scale: DataScale) -> tuple[dict, str]:
    """({"loss": "infonce_batch"} or {}, the phrase saying why): batch negatives while the
    batch's tokens fit ``INFONCE_BATCH_TOKENS`` (the logits are a square of that size)."""
    held = scale.batch * scale.tokens
    if 0 < held <= INFONCE_BATCH_TOKENS:
        return {"loss": "infonce_batch"}, (
            f", the batch's other tokens as negatives ({held} tokens a batch)"
        )
    if not held:  # the batch is unknown
        return {}, ""
    return {}, (f"; the cosine loss: a batch of {held} tokens is above the "
                f"{INFONCE_BATCH_TOKENS} that infonce_batch's square of logits is sized for")  # fmt: skip


def choose(scale: DataScale, explicit: set[str]) -> tuple[dict, str]:
    """(objective keys to set, the reason); keys in ``explicit`` are left to the config."""
    size = f"{scale.samples:,} training samples" if scale.samples else "a streamed training set"
    size += f", {scale.tokens} tokens per sample"
    if scale.discrete:
        size += ", discrete tokens"
        loss, neg = batch_negatives(scale)
        pick = {"target": "patch", **loss}
        why = ("discrete tokens: the next token's ids through the tokenizer's fixed one-hot "
               f"view, not a learned table{neg}, as measured best on word-language "
               "identification and checked on man-page lines (docs/text.md)")  # fmt: skip
    elif scale.samples is not None and scale.samples < SMALL_DATA:
        horizon, how = choose_horizon(scale)
        loss, neg = batch_negatives(scale)
        pick = {"target_norm": "instance", "head": "mlp", "horizon": horizon, **loss}
        why = (f"small data (< {SMALL_DATA:,} samples): instance-normalised targets, an MLP "
               f"head, {how}{neg}, as measured best on Fashion-MNIST, the spoken digits "
               "and the video demo's clips (docs/small-data.md, docs/objectives.md, "
               "docs/demos.md)")  # fmt: skip
    else:
        pick = {}
        why = f"large data (>= {SMALL_DATA:,} samples or streamed): the release objective"
    keep = {k: v for k, v in pick.items() if k not in explicit}
    kept = sorted(set(pick) - set(keep))
    said = ", ".join(f"{k}={v}" for k, v in keep.items()) or "no change"
    note = f"; kept your {', '.join(kept)}" if kept else ""
    return keep, f"model.objective.auto: {size} -> {said} ({why}{note})"


def resolve(mc, source, tokenizer, explicit: set[str], log=print, batch: int = 0):
    """``mc`` (a ModelConfig) with its objective chosen from the data (``batch``: samples per
    device batch); prints one line."""
    scale = measure(source, tokenizer, batch)
    keys, line = choose(scale, explicit)
    log(line)
    mc.objective = dataclasses.replace(mc.objective, **keys)
    return mc
