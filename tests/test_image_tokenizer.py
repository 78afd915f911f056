import pytest
import torch
from unipred.tokenizers.image import ImageTokenizer


def test_raster_order_and_centre_coords():
    tok = ImageTokenizer(dim=8, patch_size=2, in_chans=1)
    x = torch.zeros(1, 1, 4, 6)
    x[0, 0, 2:4, 4:6] = 1.0  # bottom-right patch: row 1, column 2 -> index 1*3+2 = 5
    out = tok(x)
    assert out.tokens.shape == (1, 6, 8) and out.coords.shape == (6, 2) and out.valid is None
    moved = (out.tokens[0] - tok.proj.bias).abs().sum(-1)
    assert moved.argmax().item() == 5
    assert torch.allclose(out.coords[0], torch.tensor([-0.5, -2 / 3]))
    assert torch.allclose(out.coords[5], torch.tensor([0.5, 2 / 3]))
    assert out.coords.min() > -1 and out.coords.max() < 1


def test_any_divisible_size_is_accepted():
    tok = ImageTokenizer(dim=8, patch_size=14)
    assert tok(torch.randn(1, 3, 56, 98)).tokens.shape == (1, 28, 8)


def test_bad_sizes_name_the_shapes():
    tok = ImageTokenizer(dim=8, patch_size=14)
    with pytest.raises(ValueError, match="50x56"):
        tok(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match=r"\(1, 1, 56, 56\)"):
        tok(torch.randn(1, 1, 56, 56))
