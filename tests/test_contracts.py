"""The tokenizer and task contracts: every shipped implementation meets them, and a plugin
that misses a piece fails at registration with one line naming it."""

import pytest
import torch
from torch import nn

from unipred import TASKS, TOKENIZERS, ClassifyTask, DataConfig, PretrainTask, Tokens
from unipred.base.contracts import ContractError, Tokenizer
from unipred.base.registry import Registry


@pytest.mark.parametrize("name", TOKENIZERS.names())
def test_every_registered_tokenizer_meets_the_protocol(name):
    tok = TOKENIZERS.get(name)(dim=32)
    assert isinstance(tok, Tokenizer)
    out = tok(tok.example_input(2))
    assert isinstance(out, Tokens) and out.tokens.shape[0] == 2 and out.tokens.shape[-1] == 32
    assert out.coords.shape[-1] == type(tok).coord_dims
    assert float(out.coords.abs().max()) <= 1.0 + 1e-6


class Good(nn.Module):
    coord_dims = 1

    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.dim, self.proj = dim, nn.Linear(patch, dim)

    def example_input(self, batch_size=2):
        return torch.randn(batch_size, 16)

    def forward(self, x):
        t = self.proj(x.unflatten(1, (-1, 4)))
        return Tokens(t, torch.linspace(-1, 1, t.shape[1])[:, None], None)


def test_a_tokenizer_missing_a_piece_fails_at_registration_naming_it():
    reg = Registry("tokenizer", check="check_tokenizer")
    reg.register("good")(Good)

    class NoCoords(Good):
        coord_dims = None

    class NoExample(Good):
        example_input = None

    class NoDim(Good):
        def __init__(self, width: int):
            super().__init__(width)

    for cls, what in ((NoCoords, "coord_dims"), (NoExample, "example_input"), (NoDim, "dim")):
        with pytest.raises(ContractError, match=f"tokenizer 'bad' .*lacks .*{what}"):
            reg.register("bad")(cls)
    assert reg.names() and "bad" not in reg._items


def test_a_task_missing_a_piece_fails_at_registration_naming_it():
    reg = Registry("task", check="check_task")

    class NoData(PretrainTask):
        pass

    with pytest.raises(ContractError, match="task 'x' .*lacks build_dataset"):
        reg.register("x")(NoData)

    class NoClasses(ClassifyTask):
        data_config = DataConfig

        def build_dataset(self, split):
            return None

    with pytest.raises(ContractError, match="num_classes field"):
        reg.register("y")(NoClasses)
    assert set(TASKS.names()) >= {"image_pretrain", "audio_classify", "video_pretrain"}
