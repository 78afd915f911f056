"""Discrete tokens: UTF-8 bytes, or any integer-id sequence with a known vocabulary size.

One class, :class:`DiscreteTokenizer`, registered as ``"text"``. With the defaults it reads
UTF-8 bytes (vocabulary 256); ``vocab_size`` makes it read any ids in ``[0, vocab_size)``: DNA
bases, protein residues, codes of an event log, the ids of an external subword tokenizer.

Inputs (what ``model(x)`` receives):

* a LongTensor (B, L) of ids: every position is real;
* a dict ``{"ids": (B, L), "lengths": (B,)}`` or a tuple ``(ids, lengths)``: rows are padded
  at the end, ``lengths`` says how many ids of each row are real (what
  ``unipred.tasks.text.data.pad_collate`` makes);
* a list of ``str`` or ``bytes`` (UTF-8 encoded; bytes vocabulary only), padded here.

``group`` = k ids make one token: a *strided embedding* (one table per position inside the
group, summed; the discrete twin of a patch embedding), so a token of k bytes carries more than
one id and a sequence of L ids has ceil(L / k) tokens. A group that is only partly real (the
end of a row) fills the rest with a padding id of its own; a group without a real id is
padding (``valid`` False). A row's real tokens therefore never depend on the other rows of
its batch.

Coordinates are 1-D and absolute: the centre of token t is id position (t + 0.5) * k, mapped so
that ``span`` ids cover [-1, 1]. A sample's coordinates never depend on the batch's length.

``patches(x)`` is the raw view (for ``model.objective.target=patch`` and raw-input
baselines), chosen by ``raw``:

* ``onehot``: the k one-hot vectors of the group, concatenated (k * vocab_size values; the
  padding id is all zeros). A patch target on it predicts the next group's ids, through a
  fixed, non-learned target table (the identity).
* ``ngram``: counts of the group's id 1-, 2- and 3-grams hashed into ``raw_dim`` buckets (for
  large vocabularies, where one-hot is too wide).
* ``fixed``: a fixed random Gaussian table (``raw_dim`` wide, seeded, never trained) summed
  over the group: a non-learned target table of any width.
* ``ema``: the embedding table's exponential moving average (momentum ``ema_momentum``,
  updated at every training forward pass), summed over the group: a slowly moving target
  table, as BYOL / data2vec use an EMA teacher. Not a raw view: the raw-input baselines
  should be read with ``onehot``.
"""

from __future__ import annotations

import torch
from torch import nn

from unipred.base.registry import TOKENIZERS
from unipred.base.tokens import Tokens

RAW_VIEWS = ("onehot", "ngram", "fixed", "ema")
_HASH = (1_000_003, 998_244_353, 65_537)  # multipliers of the n-gram hash
_MOD = 2_147_483_647  # kept below 2**31 after every step: no int64 overflow


def split_ids(x, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Any accepted input -> (ids (B, L) long, lengths (B,) long). Ids of padded positions are
    not read. One-line ValueError for a wrong form or an id outside the vocabulary."""
    lengths = None
    if isinstance(x, dict):
        if "ids" not in x:
            raise ValueError(f"text input dict needs an 'ids' key, got keys {sorted(x)}")
        ids, lengths = x["ids"], x.get("lengths")
    elif isinstance(x, (tuple, list)) and x and isinstance(x[0], (str, bytes)):
        return encode_batch(x, vocab_size)
    elif isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"text input tuple must be (ids, lengths), got {len(x)} items")
        ids, lengths = x
    else:
        ids = x
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"text tokenizer expects integer ids (B, L), got {ids.dtype} {tuple(ids.shape)}"
        )
    ids = ids.long()
    B, L = ids.shape
    if lengths is None:
        lengths = torch.full((B,), L, dtype=torch.long, device=ids.device)
    lengths = torch.as_tensor(lengths, device=ids.device).long().reshape(-1)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
    if bool((lengths > L).any()) or bool((lengths < 0).any()):
        raise ValueError(f"lengths must lie in [0, {L}], got {lengths.tolist()}")
    real = torch.arange(L, device=ids.device)[None, :] < lengths[:, None]
    bad = real & ((ids < 0) | (ids >= vocab_size))
    if bool(bad.any()):
        v = int(ids[bad][0])
        raise ValueError(
            f"id {v} is outside the vocabulary [0, {vocab_size}) (model.tokenizer_args.vocab_size)"
        )
    return ids, lengths


def encode_batch(texts, vocab_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of str (UTF-8 encoded) or bytes -> zero-padded ids (B, L) and lengths (B,)."""
    if vocab_size < 256:
        raise ValueError(f"strings need a bytes vocabulary (vocab_size >= 256), not {vocab_size}")
    rows = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.zeros(len(rows), max([1, *lengths.tolist()]), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.frombuffer(bytearray(r), dtype=torch.uint8).long()
    return ids, lengths


@TOKENIZERS.register("text")
class DiscreteTokenizer(nn.Module):
    """Ids (B, L) -> Tokens((B, ceil(L/k), D), (N, 1) coords, valid (B, N)).

    ``vocab_size`` ids (256: UTF-8 bytes), ``group`` = k ids per token (strided embedding),
    ``span`` ids on the coordinate range [-1, 1], ``raw`` the raw view of ``patches``
    (onehot | ngram | fixed; ``raw_dim`` values for ngram / fixed).
    """

    coord_dims = 1
    discrete = True  # an embedding table over ids: model.objective.auto picks target=patch

    def __init__(
        self,
        dim: int = 768,
        vocab_size: int = 256,
        group: int = 1,
        span: int = 1024,
        raw: str = "onehot",
        raw_dim: int = 512,
        raw_seed: int = 0,
        init_std: float = 0.02,
        ema_momentum: float = 0.99,
    ):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"text tokenizer vocab_size must be >= 2, got {vocab_size}")
        if group < 1:
            raise ValueError(f"text tokenizer group must be >= 1, got {group}")
        if span < 1:
            raise ValueError(f"text tokenizer span must be >= 1, got {span}")
        if raw not in RAW_VIEWS:
            raise ValueError(f"text tokenizer raw={raw!r}: use one of {', '.join(RAW_VIEWS)}")
        if raw != "onehot" and raw_dim < 1:
            raise ValueError(f"text tokenizer raw_dim must be >= 1 for raw={raw!r}")
        self.dim, self.vocab_size, self.group, self.span = dim, vocab_size, group, span
        self.raw, self.raw_dim = raw, raw_dim
        self.pad_id = vocab_size  # the filler of a partly real group: an id of its own
        # one (vocab + 1)-row block per position inside the group: a strided embedding
        self.embed = nn.Embedding(group * (vocab_size + 1), dim)
        nn.init.trunc_normal_(self.embed.weight, std=init_std)
        self.register_buffer(
            "offsets", torch.arange(group, dtype=torch.long) * (vocab_size + 1), persistent=False
        )
        if raw == "fixed":  # a seeded table, rebuilt identically on load: not a weight
            g = torch.Generator().manual_seed(raw_seed)
            table = torch.randn(vocab_size + 1, raw_dim, generator=g)
            table[vocab_size] = 0.0
            self.register_buffer("raw_table", table, persistent=False)
        if raw == "ema":  # saved with the weights: it is trained state
            if not 0.0 <= ema_momentum < 1.0:
                raise ValueError(
                    f"text tokenizer ema_momentum must be in [0, 1), got {ema_momentum}"
                )
            self.ema_momentum = ema_momentum
            self.register_buffer("ema_table", self.embed.weight.detach().clone())

    # ------------------------------------------------------------------------- helpers
    def grouped(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Any accepted input -> (ids (B, N, k) with the padding id where not real, valid
        (B, N): groups holding at least one real id)."""
        ids, lengths = split_ids(x, self.vocab_size)
        B, L = ids.shape
        k = self.group
        n = max(1, -(-L // k))
        pos = torch.arange(n * k, device=ids.device)
        real = pos[None, :] < lengths[:, None]  # (B, n*k)
        ids = torch.nn.functional.pad(ids, (0, n * k - L))
        ids = torch.where(real, ids, torch.full_like(ids, self.pad_id))
        valid = real.view(B, n, k).any(dim=-1)
        return ids.view(B, n, k), valid

    def coords(self, n: int, device) -> torch.Tensor:
        """(n, 1) token centres, (t + 0.5) * group ids, with ``span`` ids on [-1, 1]."""
        t = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * self.group
        return (2.0 * t / self.span - 1.0)[:, None]

    def example_input(self, batch_size: int = 2) -> dict:
        """Rows of different lengths (the first full, the rest half), for automatic tests."""
        L = 4 * self.group
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (batch_size, L), generator=g)
        lengths = torch.tensor([L] + [L // 2] * (batch_size - 1))
        return {"ids": ids, "lengths": lengths}

    # ---------------------------------------------------------------------- the tokens
    def forward(self, x) -> Tokens:
        ids, valid = self.grouped(x)  # (B, N, k), (B, N)
        if self.raw == "ema" and self.training and torch.is_grad_enabled():
            with torch.no_grad():  # the table as it was before this step's update
                w = self.embed.weight.detach().to(self.ema_table.dtype)
                self.ema_table.lerp_(w, 1.0 - self.ema_momentum)
        t = self.embed(ids + self.offsets).sum(dim=2)  # (B, N, k, D) -> (B, N, D)
        valid_or_none = None if bool(valid.all()) else valid
        return Tokens(t, self.coords(ids.shape[1], ids.device), valid_or_none)

    # ------------------------------------------------------------------- the raw view
    @property
    def patch_dim(self) -> int:
        """Values per raw patch (``patches``)."""
        if self.raw == "ema":
            return self.dim
        return self.group * self.vocab_size if self.raw == "onehot" else self.raw_dim

    def patches(self, x) -> torch.Tensor:
        """Any accepted input -> the raw view of every token (B, N, patch_dim), float32."""
        ids, _ = self.grouped(x)
        B, N, k = ids.shape
        if self.raw == "onehot":
            # the padding id is column vocab_size, dropped: a padding slot is all zeros
            oh = torch.nn.functional.one_hot(ids, self.vocab_size + 1)[..., : self.vocab_size]
            return oh.float().reshape(B, N, k * self.vocab_size)
        if self.raw == "fixed":
            return self.raw_table[ids].sum(dim=2)  # (B, N, k, R) -> (B, N, R)
        if self.raw == "ema":
            offsets = self.offsets.to(ids.device)
            return self.ema_table[ids + offsets].float().sum(dim=2)  # (B, N, D)
        return self._ngram_counts(ids)

    def _ngram_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """Hashed counts of the id 1-, 2-, 3-grams inside each group (padding excluded)."""
        B, N, k = ids.shape
        out = torch.zeros(B, N, self.raw_dim, device=ids.device)
        real = ids != self.pad_id
        for n in range(1, min(3, k) + 1):
            h = torch.zeros(B, N, k - n + 1, dtype=torch.long, device=ids.device)
            ok = torch.ones_like(h, dtype=torch.bool)
            for j in range(n):
                h = (h * _HASH[j % 3] + ids[..., j : k - n + 1 + j] + 1) % _MOD
                ok &= real[..., j : k - n + 1 + j]
            h = (h * 31 + n) % self.raw_dim
            out.scatter_add_(2, h, ok.float())
        return out
