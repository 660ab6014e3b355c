"""Tests for feature, attention and relational distillation losses against naive references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from potstill.losses.attention import (
    attention_kl,
    attention_mse,
    attention_transfer,
    minilm_relation_loss,
)
from potstill.losses.features import (
    FEATURE_KINDS,
    ConvProjector,
    explicit_layer_map,
    feature_distance,
    last_k_layer_map,
    make_projector,
    uniform_layer_map,
)
from potstill.losses.relational import pkt, rkd_angle, rkd_distance

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _randn(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).mul(scale).to(dtype)


def _probs(*shape: int, seed: int) -> torch.Tensor:
    """Random attention probabilities (softmax over the last dim), no ties, no zeros."""
    return torch.softmax(_randn(*shape, seed=seed, scale=1.5), dim=-1)


def _mask(batch: int, length: int, seed: int) -> torch.Tensor:
    """A (B, T) padding-style mask with varied lengths, at least one real token per row."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return torch.arange(length)[None, :] < lengths[:, None]


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _close(actual: torch.Tensor, expected: float) -> None:
    assert actual.dim() == 0
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), **TOL)


# --- naive references, one index at a time, straight from the formulas ---


def _ref_norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _ref_normalize(v: list[float], eps: float = 1e-12) -> list[float]:
    n = max(_ref_norm(v), eps)
    return [x / n for x in v]


def _ref_smooth_l1(d: float, beta: float) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def _vectors_along(x: torch.Tensor, dim: int) -> list[list[float]]:
    """The feature vectors of ``x`` along ``dim``, one per position, in a fixed order."""
    moved = x.movedim(dim, -1)
    positions = itertools.product(*(range(n) for n in moved.shape[:-1]))
    return [[float(moved[pos + (c,)]) for c in range(moved.shape[-1])] for pos in positions]


def _ref_feature(s, t, kind, dim, normalize, beta) -> float:
    s_vecs, t_vecs = _vectors_along(s, dim), _vectors_along(t, dim)
    if normalize:
        s_vecs = [_ref_normalize(v) for v in s_vecs]
        t_vecs = [_ref_normalize(v) for v in t_vecs]
    if kind == "cosine":
        terms = []
        for a, b in zip(s_vecs, t_vecs, strict=True):
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            terms.append(1.0 - dot / max(_ref_norm(a) * _ref_norm(b), 1e-16))
        return sum(terms) / len(terms)
    diffs = [x - y for a, b in zip(s_vecs, t_vecs, strict=True) for x, y in zip(a, b, strict=True)]
    if kind == "mse":
        return sum(d * d for d in diffs) / len(diffs)
    return sum(_ref_smooth_l1(d, beta) for d in diffs) / len(diffs)


def _ref_attention_mse(s, t, mask) -> float:
    b_, h_, t_, _ = s.shape
    total, count = 0.0, 0
    for b, h, i, j in itertools.product(range(b_), range(h_), range(t_), range(t_)):
        if mask is None or (mask[b, i] and mask[b, j]):
            total += (float(s[b, h, i, j]) - float(t[b, h, i, j])) ** 2
            count += 1
    return total / count if count else 0.0


def _ref_attention_kl(s, t, mask, eps=1e-12) -> float:
    b_, h_, t_, _ = s.shape
    total, count = 0.0, 0
    for b, h, i in itertools.product(range(b_), range(h_), range(t_)):
        if mask is not None and not mask[b, i]:
            continue
        row = 0.0
        for j in range(t_):
            p, q = float(t[b, h, i, j]), float(s[b, h, i, j])
            if p > 0:
                row += p * (math.log(max(p, eps)) - math.log(max(q, eps)))
        total += row
        count += 1
    return total / count if count else 0.0


def _ref_relation(x, r: int, mask) -> list:
    """rel[b][h][i] = dict key j -> probability, over valid keys."""
    b_, t_, d = x.shape
    dh = d // r
    rel = []
    for b in range(b_):
        per_head = []
        for h in range(r):
            rows = []
            for i in range(t_):
                keys = [j for j in range(t_) if mask is None or mask[b, j]]
                scores = {
                    j: sum(
                        float(x[b, i, h * dh + c]) * float(x[b, j, h * dh + c]) for c in range(dh)
                    )
                    / math.sqrt(dh)
                    for j in keys
                }
                m = max(scores.values()) if scores else 0.0
                exps = {j: math.exp(v - m) for j, v in scores.items()}
                z = sum(exps.values())
                rows.append({j: e / z for j, e in exps.items()})
            per_head.append(rows)
        rel.append(per_head)
    return rel


def _ref_minilm(s_qkv, t_qkv, r: int, mask) -> float:
    total = 0.0
    for s_x, t_x in zip(s_qkv, t_qkv, strict=True):
        rs, rt = _ref_relation(s_x, r, mask), _ref_relation(t_x, r, mask)
        b_, t_ = s_x.shape[:2]
        acc, count = 0.0, 0
        for b, h, i in itertools.product(range(b_), range(r), range(t_)):
            if mask is not None and not mask[b, i]:
                continue
            acc += sum(p * math.log(p / rs[b][h][i][j]) for j, p in rt[b][h][i].items())
            count += 1
        total += acc / count if count else 0.0
    return total


def _ref_bilinear(img: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Bilinear resize with align_corners=False (half-pixel centres, edge clamping)."""
    in_h, in_w = len(img), len(img[0])

    def coords(out_i: int, in_n: int, out_n: int) -> tuple[int, int, float]:
        src = max((out_i + 0.5) * in_n / out_n - 0.5, 0.0)
        lo = min(int(math.floor(src)), in_n - 1)
        hi = min(lo + 1, in_n - 1)
        return lo, hi, src - lo

    out = []
    for y in range(out_h):
        y0, y1, fy = coords(y, in_h, out_h)
        row = []
        for x in range(out_w):
            x0, x1, fx = coords(x, in_w, out_w)
            top = img[y0][x0] * (1 - fx) + img[y0][x1] * fx
            bottom = img[y1][x0] * (1 - fx) + img[y1][x1] * fx
            row.append(top * (1 - fy) + bottom * fy)
        out.append(row)
    return out


def _ref_at_maps(x, p: float, size=None) -> list[list[float]]:
    b_, c_, h_, w_ = x.shape
    maps = []
    for b in range(b_):
        img = [
            [sum(abs(float(x[b, c, i, j])) ** p for c in range(c_)) / c_ for j in range(w_)]
            for i in range(h_)
        ]
        if size is not None and (h_, w_) != size:
            img = _ref_bilinear(img, *size)
        maps.append(_ref_normalize([v for row in img for v in row]))
    return maps


def _ref_attention_transfer(s, t, p: float) -> float:
    t_maps = _ref_at_maps(t, p)
    s_maps = _ref_at_maps(s, p, size=tuple(t.shape[-2:]))
    diffs = [
        a - b for sm, tm in zip(s_maps, t_maps, strict=True) for a, b in zip(sm, tm, strict=True)
    ]
    return sum(d * d for d in diffs) / len(diffs)


def _rows(x) -> list[list[float]]:
    flat = x.reshape(x.shape[0], -1)
    return [[float(v) for v in row] for row in flat]


def _ref_rkd_distance(s, t) -> float:
    def normalized(rows):
        n = len(rows)
        d = {
            (i, j): _ref_norm([a - b for a, b in zip(rows[i], rows[j], strict=True)])
            for i in range(n)
            for j in range(n)
            if i != j
        }
        mean = sum(d.values()) / len(d)
        return {k: v / mean for k, v in d.items()}

    ds, dt = normalized(_rows(s)), normalized(_rows(t))
    return sum(_ref_smooth_l1(ds[k] - dt[k], 1.0) for k in ds) / len(ds)


def _ref_rkd_angle(s, t) -> float:
    def cosines(rows):
        n = len(rows)

        def unit(i, j):
            if i == j:
                return [0.0] * len(rows[0])
            return _ref_normalize([a - b for a, b in zip(rows[i], rows[j], strict=True)])

        out = {}
        for i, j, k in itertools.product(range(n), repeat=3):
            out[i, j, k] = sum(a * b for a, b in zip(unit(i, j), unit(k, j), strict=True))
        return out

    cs, ct = cosines(_rows(s)), cosines(_rows(t))
    return sum(_ref_smooth_l1(cs[k] - ct[k], 1.0) for k in cs) / len(cs)


def _ref_pkt(s, t, eps=1e-7) -> float:
    def cond(rows):
        units = [_ref_normalize(r) for r in rows]
        n = len(units)
        sim = [
            [
                (sum(a * b for a, b in zip(units[i], units[j], strict=True)) + 1) / 2
                for j in range(n)
            ]
            for i in range(n)
        ]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = cond(_rows(s)), cond(_rows(t))
    n = len(ps)
    total = sum(
        pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)
    )
    return total / n


# --- feature_distance ---


FEATURE_CASES = [((3, 4, 5), -1), ((4, 6), -1), ((2, 3, 4, 5), 1)]


@pytest.mark.parametrize("kind", FEATURE_KINDS)
@pytest.mark.parametrize(("shape", "dim"), FEATURE_CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_feature_distance_matches_reference(kind, shape, dim, normalize):
    s, t = _randn(*shape, seed=1), _randn(*shape, seed=2)
    for beta in (1.0, 0.4):
        expected = _ref_feature(s, t, kind, dim, normalize, beta)
        _close(feature_distance(s, t, kind, dim=dim, normalize=normalize, beta=beta), expected)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
@pytest.mark.parametrize(("shape", "dim"), FEATURE_CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_feature_distance_gradcheck(kind, shape, dim, normalize):
    s, t = _leaf(_randn(*shape, seed=3)), _leaf(_randn(*shape, seed=4))
    assert gradcheck(
        lambda a, b: feature_distance(a, b, kind, dim=dim, normalize=normalize, beta=0.7), (s, t)
    )


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_feature_distance_identical_is_zero(kind):
    x = _randn(2, 3, 4, 5, seed=5)
    assert feature_distance(x, x.clone(), kind, dim=1).abs() < 1e-12


def test_cosine_distance_invariant_to_positive_scaling():
    s, t = _randn(3, 4, 5, seed=6), _randn(3, 4, 5, seed=7)
    scale = torch.rand(3, 4, 1, dtype=torch.float64) * 5 + 0.1  # per-position, positive
    base = feature_distance(s, t, "cosine")
    torch.testing.assert_close(feature_distance(s * scale, t, "cosine"), base, **TOL)
    torch.testing.assert_close(feature_distance(s, t * 3.0, "cosine"), base, **TOL)


def test_feature_distance_dtypes():
    s, t = _randn(2, 3, seed=8, dtype=torch.float16), _randn(2, 3, seed=9, dtype=torch.float16)
    assert feature_distance(s, t).dtype == torch.float32
    assert feature_distance(s.double(), t.double()).dtype == torch.float64


def test_feature_distance_errors():
    with pytest.raises(ValueError, match=r"student \(2, 3\) and teacher \(2, 4\)"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="accepted kinds: mse, smooth_l1, cosine"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 3), "l2")
    with pytest.raises(ValueError, match="out of range"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 3), dim=2)


# --- projectors ---


def test_projector_linear_for_tokens_and_vectors():
    proj = make_projector((2, 7, 16), (2, 7, 32))
    assert isinstance(proj, nn.Linear)
    assert (proj.in_features, proj.out_features) == (16, 32)
    assert proj(torch.randn(2, 7, 16)).shape == (2, 7, 32)
    vec = make_projector(torch.Size([4, 8]), torch.Size([4, 3]))
    assert isinstance(vec, nn.Linear) and vec(torch.randn(4, 8)).shape == (4, 3)


def test_projector_conv_with_resize():
    proj = make_projector((2, 16, 14, 14), (2, 32, 7, 7))
    assert isinstance(proj, ConvProjector)
    assert proj(torch.randn(2, 16, 14, 14)).shape == (2, 32, 7, 7)
    same_size = make_projector((2, 16, 7, 7), (2, 32, 7, 7))
    assert isinstance(same_size, ConvProjector) and same_size.size is None
    assert same_size(torch.randn(2, 16, 7, 7)).shape == (2, 32, 7, 7)


def test_projector_none_for_equal_shapes():
    assert make_projector((2, 7, 16), (2, 7, 16)) is None
    assert make_projector((2, 16), (5, 16)) is None  # the batch size is not compared
    assert make_projector((2, 8, 7, 7), (2, 8, 7, 7)) is None


def test_projector_errors():
    with pytest.raises(ValueError, match="other than batch and features"):
        make_projector((2, 7, 16), (2, 9, 32))
    with pytest.raises(ValueError, match="same rank"):
        make_projector((2, 16), (2, 7, 16))
    with pytest.raises(ValueError, match="rank-5"):
        make_projector((2, 3, 4, 5, 6), (2, 3, 4, 5, 7))


# --- layer maps ---


def test_uniform_layer_map():
    assert uniform_layer_map(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert uniform_layer_map(3, 30) == [(0, 9), (1, 19), (2, 29)]
    assert uniform_layer_map(5, 5) == [(i, i) for i in range(5)]
    # half-up rounding: (i+1)·6/4 = 1.5, 4.5 round up (banker's round would give 2 and 4)
    assert uniform_layer_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    for n_s, n_t in itertools.product(range(1, 9), range(1, 25)):
        if n_s <= n_t:
            teachers = [t for _, t in uniform_layer_map(n_s, n_t)]
            assert teachers == sorted(set(teachers)) and teachers[-1] == n_t - 1
            assert teachers[0] >= 0


def test_last_k_layer_map():
    assert last_k_layer_map(6, 12, 3) == [(3, 9), (4, 10), (5, 11)]
    assert last_k_layer_map(4, 4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_explicit_layer_map():
    assert explicit_layer_map([(0, 3), (1, 7)], 2, 8) == [(0, 3), (1, 7)]
    assert explicit_layer_map(iter([(1, 0)]), 2, 8) == [(1, 0)]


def test_layer_map_errors():
    with pytest.raises(ValueError, match="n_student <= n_teacher.*n_student=6.*n_teacher=4"):
        uniform_layer_map(6, 4)
    with pytest.raises(ValueError, match="n_student must be positive"):
        uniform_layer_map(0, 4)
    with pytest.raises(ValueError, match="n_teacher must be positive"):
        last_k_layer_map(3, -1, 1)
    with pytest.raises(ValueError, match="k=4 is out of range"):
        last_k_layer_map(3, 12, 4)
    with pytest.raises(ValueError, match="k must be positive"):
        last_k_layer_map(3, 12, 0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*student layer 2"):
        explicit_layer_map([(0, 1), (2, 3)], 2, 8)
    with pytest.raises(ValueError, match=r"\(1, 8\).*teacher layer 8"):
        explicit_layer_map([(1, 8)], 2, 8)
    with pytest.raises(ValueError, match=r"\(-1, 0\)"):
        explicit_layer_map([(-1, 0)], 2, 8)
    with pytest.raises(ValueError, match="at least one"):
        explicit_layer_map([], 2, 8)
    with pytest.raises(ValueError, match="pair"):
        explicit_layer_map([(0, 1, 2)], 2, 8)


# --- attention ---


ATTN_SHAPE = (3, 2, 5, 5)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_losses_match_reference(masked):
    s, t = _probs(*ATTN_SHAPE, seed=10), _probs(*ATTN_SHAPE, seed=11)
    mask = _mask(3, 5, seed=12) if masked else None
    _close(attention_mse(s, t, mask), _ref_attention_mse(s, t, mask))
    _close(attention_kl(s, t, mask), _ref_attention_kl(s, t, mask))


@pytest.mark.parametrize("masked", [False, True])
def test_attention_losses_gradcheck(masked):
    s, t = _leaf(_probs(*ATTN_SHAPE, seed=13)), _leaf(_probs(*ATTN_SHAPE, seed=14))
    mask = _mask(3, 5, seed=15) if masked else None
    assert gradcheck(lambda a, b: attention_mse(a, b, mask), (s, t))
    assert gradcheck(lambda a, b: attention_kl(a, b, mask), (s, t))


def test_attention_losses_identical_is_zero():
    x = _probs(*ATTN_SHAPE, seed=16)
    mask = _mask(3, 5, seed=17)
    for fn in (attention_mse, attention_kl):
        assert fn(x, x.clone()) == 0
        assert fn(x, x.clone(), mask) == 0


def test_attention_losses_empty_mask_is_zero_with_finite_grads():
    s, t = _leaf(_probs(*ATTN_SHAPE, seed=18)), _leaf(_probs(*ATTN_SHAPE, seed=19))
    empty = torch.zeros(3, 5, dtype=torch.bool)
    for fn in (attention_mse, attention_kl):
        loss = fn(s, t, empty)
        assert loss == 0
        s_grad, t_grad = torch.autograd.grad(loss, (s, t))
        assert torch.isfinite(s_grad).all() and torch.isfinite(t_grad).all()


def test_attention_errors():
    s, t = _probs(2, 4, 5, 5, seed=20), _probs(2, 8, 5, 5, seed=21)
    with pytest.raises(ValueError, match=r"equal head counts.*minilm_relation_loss"):
        attention_mse(s, t)
    with pytest.raises(ValueError, match=r"student \(2, 4, 5, 5\) and teacher \(2, 8, 5, 5\)"):
        attention_kl(s, t)
    with pytest.raises(ValueError, match="mask shape"):
        attention_mse(s, s, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        attention_mse(s, s, torch.ones(2, 5))


def _qkv(batch: int, length: int, hidden: int, seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(_randn(batch, length, hidden, seed=seed + i) for i in range(3))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("d_s", "d_t", "r"), [(4, 4, 2), (6, 8, 2), (4, 12, 4)])
def test_minilm_matches_reference(masked, d_s, d_t, r):
    s, t = _qkv(2, 4, d_s, seed=30), _qkv(2, 4, d_t, seed=40)
    mask = _mask(2, 4, seed=50) if masked else None
    expected = _ref_minilm(s, t, r, mask)
    _close(minilm_relation_loss(s, t, num_relation_heads=r, mask=mask), expected)


@pytest.mark.parametrize("masked", [False, True])
def test_minilm_gradcheck(masked):
    s = tuple(_leaf(x) for x in _qkv(2, 4, 4, seed=60))
    t = tuple(_leaf(x) for x in _qkv(2, 4, 6, seed=70))
    mask = _mask(2, 4, seed=80) if masked else None
    mask = None if mask is None else mask.index_fill(0, torch.tensor([1]), False)  # one empty row

    def fn(*xs):
        return minilm_relation_loss(xs[:3], xs[3:], num_relation_heads=2, mask=mask)

    assert gradcheck(fn, s + t)


def test_minilm_identical_is_zero_and_empty_mask():
    s = _qkv(2, 4, 8, seed=90)
    assert minilm_relation_loss(s, tuple(x.clone() for x in s), num_relation_heads=4).abs() < 1e-12
    s_leaf = tuple(_leaf(x) for x in s)
    t_leaf = tuple(_leaf(x) for x in _qkv(2, 4, 6, seed=95))
    empty = torch.zeros(2, 4, dtype=torch.bool)
    loss = minilm_relation_loss(s_leaf, t_leaf, num_relation_heads=2, mask=empty)
    assert loss == 0
    grads = torch.autograd.grad(loss, s_leaf + t_leaf)
    assert all(torch.isfinite(g).all() for g in grads)


def test_minilm_different_hidden_sizes_and_head_counts():
    # student: 4 heads of 8 (D=32); teacher: 12 heads of 16 (D=192); relations use R=8.
    s = tuple(_leaf(x) for x in _qkv(2, 6, 32, seed=100))
    t = _qkv(2, 6, 192, seed=110)
    loss = minilm_relation_loss(s, t, num_relation_heads=8, mask=_mask(2, 6, seed=120))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)


def test_minilm_errors():
    s, t = _qkv(2, 4, 6, seed=130), _qkv(2, 4, 8, seed=140)
    with pytest.raises(ValueError, match=r"student q hidden size 6.*num_relation_heads=4"):
        minilm_relation_loss(s, t, num_relation_heads=4)
    with pytest.raises(ValueError, match="share"):
        minilm_relation_loss(s, _qkv(2, 5, 8, seed=150), num_relation_heads=2)
    with pytest.raises(ValueError, match=r"\(q, k, v\)"):
        minilm_relation_loss(s[:2], t, num_relation_heads=2)
    with pytest.raises(ValueError, match="positive"):
        minilm_relation_loss(s, t, num_relation_heads=0)


AT_CASES = [
    ((2, 3, 4, 5), (2, 6, 4, 5)),
    ((2, 3, 6, 6), (2, 4, 3, 4)),
    ((2, 2, 3, 3), (2, 5, 5, 7)),
]


@pytest.mark.parametrize(("s_shape", "t_shape"), AT_CASES)
@pytest.mark.parametrize("p", [2, 1.5])
def test_attention_transfer_matches_reference(s_shape, t_shape, p):
    s, t = _randn(*s_shape, seed=160), _randn(*t_shape, seed=170)
    _close(attention_transfer(s, t, p=p), _ref_attention_transfer(s, t, p))


@pytest.mark.parametrize(("s_shape", "t_shape"), AT_CASES)
def test_attention_transfer_gradcheck(s_shape, t_shape):
    s, t = _leaf(_randn(*s_shape, seed=180)), _leaf(_randn(*t_shape, seed=190))
    assert gradcheck(lambda a, b: attention_transfer(a, b), (s, t))
    assert gradcheck(lambda a, b: attention_transfer(a, b, p=3), (s, t))


def test_attention_transfer_invariances():
    s, t = _randn(2, 3, 4, 5, seed=200), _randn(2, 6, 4, 5, seed=210)
    assert attention_transfer(s, s.clone()) == 0
    base = attention_transfer(s, t)
    torch.testing.assert_close(attention_transfer(s * 7.5, t), base, **TOL)
    torch.testing.assert_close(attention_transfer(s, t * 0.2), base, **TOL)


def test_attention_transfer_errors():
    with pytest.raises(ValueError, match="4-D"):
        attention_transfer(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch size"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))


# --- relational ---


REL_SHAPES = [((5, 3), (5, 7)), ((4, 2, 3), (4, 5))]


@pytest.mark.parametrize(("s_shape", "t_shape"), REL_SHAPES)
def test_relational_match_reference(s_shape, t_shape):
    s, t = _randn(*s_shape, seed=220), _randn(*t_shape, seed=230)
    _close(rkd_distance(s, t), _ref_rkd_distance(s, t))
    _close(rkd_angle(s, t), _ref_rkd_angle(s, t))
    _close(pkt(s, t), _ref_pkt(s, t))


@pytest.mark.parametrize(("s_shape", "t_shape"), REL_SHAPES)
def test_relational_gradcheck(s_shape, t_shape):
    s, t = _leaf(_randn(*s_shape, seed=240)), _leaf(_randn(*t_shape, seed=250))
    for fn in (rkd_distance, rkd_angle, pkt):
        assert gradcheck(fn, (s, t))


def test_relational_identical_is_zero():
    x = _randn(6, 4, seed=260)
    assert rkd_distance(x, x.clone()).abs() < 1e-12
    assert rkd_angle(x, x.clone()).abs() < 1e-12
    assert pkt(x, x.clone()).abs() < 1e-12


def test_rkd_invariances():
    s, t = _randn(6, 4, seed=270), _randn(6, 9, seed=280)
    d, a = rkd_distance(s, t), rkd_angle(s, t)
    assert d > 0 and a > 0
    torch.testing.assert_close(rkd_distance(s * 13.0, t), d, **TOL)
    torch.testing.assert_close(rkd_distance(s * 0.05, t), d, **TOL)
    torch.testing.assert_close(rkd_angle(s * 13.0, t), a, **TOL)
    torch.testing.assert_close(rkd_angle(s + _randn(1, 4, seed=290, scale=3.0), t), a, **TOL)
    torch.testing.assert_close(rkd_angle(s * 0.3 - 2.0, t), a, **TOL)


def test_rkd_coincident_points_have_finite_grads():
    s = _randn(4, 3, seed=300)
    s = _leaf(torch.cat([s, s[:1]]))  # rows 0 and 4 coincide
    t = _leaf(_randn(5, 6, seed=310))
    for fn in (rkd_distance, rkd_angle):
        grads = torch.autograd.grad(fn(s, t), (s, t))
        assert all(torch.isfinite(g).all() for g in grads)


def test_relational_float32_diagonal_grads_are_small():
    # The zero diagonal of the distance/angle computation must not leak huge gradients.
    s = _leaf(_randn(16, 32, seed=320, scale=100.0, dtype=torch.float32))
    t = _randn(16, 8, seed=330, dtype=torch.float32)
    for fn in (rkd_distance, rkd_angle):
        (grad,) = torch.autograd.grad(fn(s, t), (s,))
        s64 = _leaf(s.detach().double())
        (grad64,) = torch.autograd.grad(fn(s64, t.double()), (s64,))
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-3, atol=1e-6)


def test_relational_errors():
    with pytest.raises(ValueError, match="same batch size"):
        rkd_distance(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        rkd_distance(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        pkt(torch.zeros(1, 3), torch.zeros(1, 3))


def test_losses_are_scalars_in_float32_for_half_inputs():
    h = torch.float16
    s4, t4 = _randn(2, 3, 4, 4, seed=340, dtype=h), _randn(2, 5, 4, 4, seed=350, dtype=h)
    a_s, a_t = _probs(2, 2, 4, 4, seed=360).to(h), _probs(2, 2, 4, 4, seed=370).to(h)
    v_s, v_t = _randn(4, 3, seed=380, dtype=h), _randn(4, 6, seed=390, dtype=h)
    qkv_s = tuple(x.to(h) for x in _qkv(2, 4, 4, seed=400))
    qkv_t = tuple(x.to(h) for x in _qkv(2, 4, 8, seed=410))
    results = [
        attention_transfer(s4, t4),
        attention_mse(a_s, a_t),
        attention_kl(a_s, a_t),
        minilm_relation_loss(qkv_s, qkv_t, num_relation_heads=2),
        rkd_distance(v_s, v_t),
        rkd_angle(v_s, v_t),
        pkt(v_s, v_t),
    ]
    for r in results:
        assert r.dim() == 0 and r.dtype == torch.float32 and torch.isfinite(r)
