import pytest
import torch

from unipred import NEPA, next_embedding_loss


def test_perfect_prediction_is_minus_one():
    t = torch.randn(3, 9, 16)
    pred = torch.zeros_like(t)
    pred[:, :-1] = t[:, 1:] * 2.5  # cosine ignores scale
    assert next_embedding_loss(pred, t).item() == pytest.approx(-1.0, abs=1e-6)


def test_shift_is_by_one():
    t = torch.randn(2, 5, 8)
    # predicting the current token instead of the next one is not a perfect score
    assert next_embedding_loss(t.clone(), t).item() > -0.9


def test_valid_mask_excludes_padded_pairs():
    t = torch.randn(2, 6, 8)
    pred = torch.randn(2, 6, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    pred2 = pred.clone()
    pred2[1, 3:] = torch.randn(3, 8)  # position 3 predicts padded 4: must not count
    t2 = t.clone()
    t2[1, 4:] = torch.randn(2, 8)
    assert torch.allclose(
        next_embedding_loss(pred, t, valid), next_embedding_loss(pred2, t2, valid)
    )


def test_shape_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5, 8\)"):
        next_embedding_loss(torch.randn(2, 5, 8), torch.randn(2, 6, 8))


def test_stop_gradient_on_target_but_embedding_still_learns():
    m = NEPA.from_name("nepa_debug")
    x = torch.randn(2, 3, 16, 16)
    seq, coords, valid = m.embed(x)
    hidden = m.predictor(seq, coords, valid)
    # no gradient flows into the targets from the loss
    g = torch.autograd.grad(next_embedding_loss(hidden, seq), seq, retain_graph=True)[0]
    g_pred_only = torch.autograd.grad(
        (hidden[:, :-1] * 0).sum() + next_embedding_loss(hidden, seq.detach()), seq
    )[0]
    assert torch.allclose(g, g_pred_only)
    # ...and yet the patch embedding receives gradient through the input side
    m.zero_grad()
    m(x).loss.backward()
    assert m.tokenizer.proj.weight.grad.abs().sum() > 0
    assert m.cls_token.grad.abs().sum() > 0
