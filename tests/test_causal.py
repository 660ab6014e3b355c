"""Causal-LM plumbing: the positions a token-level loss compares, and the shared vocabulary."""

from __future__ import annotations

import pytest
import torch

from potstill.losses.divergences import divergence
from potstill.losses.forms import shared_vocabulary
from potstill.losses.tokens import next_token_mask, token_divergence


def _reference_mask(attention_mask, labels=None, prompt_lengths=None, ignore_index=-100):
    # written from the definition, one position at a time
    b, t = attention_mask.shape
    out = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        for j in range(t - 1):
            ok = bool(attention_mask[i, j + 1])
            if labels is not None:
                ok = ok and int(labels[i, j + 1]) != ignore_index
            if prompt_lengths is not None:
                ok = ok and j + 1 >= int(prompt_lengths[i])
            out[i, j] = ok
    return out


def test_right_padding_prompt_and_labels():
    attn = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[5, 6, 7, 8, -100, -100], [1, 2, -100, 4, 5, 6]])
    prompts = torch.tensor([2, 1])
    got = next_token_mask(attn, labels=labels, prompt_lengths=prompts)
    assert torch.equal(got, _reference_mask(attn, labels, prompts))
    # row 0: positions 1 and 2 predict tokens 2 and 3 (after the 2-token prompt), the rest pad
    assert got[0].tolist() == [False, True, True, False, False, False]
    # row 1: position 1 predicts the ignored label; the last position predicts nothing
    assert got[1].tolist() == [True, False, True, True, True, False]


def test_left_padding():
    attn = torch.tensor([[0, 0, 1, 1, 1]])
    got = next_token_mask(attn)
    assert got[0].tolist() == [False, True, True, True, False]
    assert torch.equal(got, _reference_mask(attn))


def test_random_masks_match_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        attn = (torch.rand(4, 9, generator=g) > 0.3).long()
        labels = torch.where(torch.rand(4, 9, generator=g) > 0.2, 1, -100)
        prompts = torch.randint(0, 9, (4,), generator=g)
        got = next_token_mask(attn, labels=labels, prompt_lengths=prompts)
        assert torch.equal(got, _reference_mask(attn, labels, prompts))


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        next_token_mask(torch.ones(3))
    with pytest.raises(ValueError, match="labels shape"):
        next_token_mask(torch.ones(2, 4), labels=torch.ones(2, 5))


def test_shared_vocabulary_cuts_padding_rows():
    s, t = torch.randn(2, 3, 100), torch.randn(2, 3, 128)
    s2, t2 = shared_vocabulary(s, t)
    assert s2.shape[-1] == t2.shape[-1] == 100 and torch.equal(t2, t[..., :100])


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_token_divergence_equals_divergence_on_masked_positions(kind, chunk_size):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 13, generator=g, dtype=torch.float64)
    attn = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = next_token_mask(attn, prompt_lengths=torch.tensor([1, 2]))
    got = token_divergence(s, t, mask, kind, temperature=2.0, chunk_size=chunk_size)
    # reference: the masked positions picked out by hand, vocabulary cut to 11
    picked_s = s[mask]
    picked_t = t[..., :11][mask]
    want = divergence(picked_s, picked_t, kind, temperature=2.0)
    assert torch.allclose(got, want, atol=1e-10)
    (g1,) = torch.autograd.grad(got, s)
    (g2,) = torch.autograd.grad(want, s)
    assert torch.allclose(g1, g2, atol=1e-10)
