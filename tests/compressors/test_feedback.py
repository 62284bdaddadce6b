"""Error feedback: the no-loss invariant, that it makes sign-SGD converge, and EF21."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowcomm.compressors import EF21, ErrorFeedback, codec_names, get_compressor

SMALL = {"topk": {"k": 2, "chunk_size": 8}, "randk": {"k": 2, "chunk_size": 8}}


def small(name):
    return get_compressor(name, **SMALL[name]) if name in SMALL else (
        get_compressor(name) if name in ("none", "fp16", "bf16") else get_compressor(name, block_size=8))


@pytest.mark.parametrize("name", codec_names())
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 12), numel=st.integers(1, 40),
       scale=st.floats(1e-3, 1e3))
def test_error_feedback_loses_nothing(name, seed, steps, numel, scale):
    """beta = 1: sum_t D(C(x_t + e_t)) + e_T == sum_t x_t."""
    g = torch.Generator().manual_seed(seed)
    ef = ErrorFeedback(small(name), beta=1.0)
    total_x = torch.zeros(numel, dtype=torch.float64)
    total_sent = torch.zeros(numel, dtype=torch.float64)
    for _ in range(steps):
        x = torch.randn(numel, generator=g) * scale
        total_x += x.double()
        total_sent += ef.decompress(ef.compress("w", x)).double()
    lhs = total_sent + ef.residual("w").double()
    assert torch.allclose(lhs, total_x, rtol=1e-5, atol=1e-5 * total_x.abs().max().item())


def test_beta_decays_the_residual():
    ef = ErrorFeedback(get_compressor("topk", k=1, chunk_size=4, values="fp32"), beta=0.5)
    ef.compress("w", torch.tensor([4.0, 1.0, 2.0, 0.0]))
    assert torch.equal(ef.residual("w"), torch.tensor([0.0, 0.5, 1.0, 0.0]))


def test_state_dict_roundtrip_and_validation():
    ef = ErrorFeedback(get_compressor("sign", block_size=4))
    ef.compress("a", torch.tensor([1.0, -2.0, 3.0, 0.5]))
    state = ef.state_dict()
    fresh = ErrorFeedback(get_compressor("sign", block_size=4))
    fresh.load_state_dict(state)
    x = torch.tensor([0.3, 0.1, -0.2, 0.9])
    assert torch.equal(fresh.decompress(fresh.compress("a", x)), ef.decompress(ef.compress("a", x)))
    with pytest.raises(ValueError, match="finite"):
        fresh.load_state_dict({"a": torch.tensor([float("nan")])})


def _least_squares(seed=0, m=200, d=50):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)

    def loss(w):
        return float(((a @ w - b) ** 2).mean() / 2)

    def sample_grad(w, i):  # one row: a stochastic gradient
        return a[i] * (a[i] @ w - b[i])

    return loss, sample_grad, m, d


def _sgd(send, steps=3000, lr0=0.05, seed=1):
    """SGD on single-sample gradients with lr0 / (1 + t/300), each gradient
    passed through ``send`` (the compression under test)."""
    loss, sample_grad, m, d = _least_squares()
    order = torch.randint(0, m, (steps,), generator=torch.Generator().manual_seed(seed))
    w = torch.zeros(d, dtype=torch.float64)
    for t in range(steps):
        w = w - lr0 / (1 + t / 300) * send(sample_grad(w, order[t]).float()).double()
    return loss(w)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sign_with_error_feedback_reaches_sgd_loss_and_without_does_not(seed):
    sign = get_compressor("sign", block_size=50)
    ef = ErrorFeedback(sign)
    plain = _sgd(lambda g: g, seed=seed)
    with_ef = _sgd(lambda g: ef.decompress(ef.compress("g", g)), seed=seed)
    without_ef = _sgd(lambda g: sign.decompress(sign.compress(g)), seed=seed)
    assert with_ef <= plain * 1.01      # sign + EF: within 1% of uncompressed SGD
    assert without_ef > plain * 1.10    # sign alone: stuck more than 10% above it


def test_ef21_tracks_its_input_and_receiver_mirrors_it():
    sender = EF21(get_compressor("sign", block_size=4))
    receiver = EF21(get_compressor("sign", block_size=4))
    x = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for _ in range(60):
        est = receiver.apply("w", sender.compress("w", x))
    assert torch.equal(est, sender.estimate("w"))
    assert (est - x).abs().max() < 0.1
    exact = EF21(get_compressor("none"))
    exact.compress("w", x)
    assert torch.equal(exact.estimate("w"), x)
