"""The closed-form merges against an independent least-squares solver (numpy lstsq)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorm_flwr.math.merge import PINV_RCOND, psd_solve_right, smooth_gram, weighted_mean
from tests.oracles import merge_lora_a, merge_lora_b, regmean


def _clients(rng, k, n_tokens, rank_deficient=False):
    """Inputs X_i: (k, n_i); with rank_deficient, some rows are zero and n_i < k."""
    xs = []
    for n in n_tokens:
        x = rng.standard_normal((k, n))
        if rank_deficient:
            x[: k // 3] = 0.0  # dead features on every client
        xs.append(x)
    return xs


def _oracle(targets, xs, weights=None):
    """argmin_W sum_i w_i ||W X_i - T_i||^2 by lstsq on the stacked system (min-norm)."""
    weights = weights or [1.0] * len(xs)
    lhs = np.concatenate([np.sqrt(w) * x.T for w, x in zip(weights, xs)])  # (sum n, k)
    rhs = np.concatenate([np.sqrt(w) * t.T for w, t in zip(weights, targets)])  # (sum n, d)
    sol, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    return sol.T


def _grams(xs, diagonal=False):
    gs = [torch.from_numpy(x @ x.T) for x in xs]
    return [torch.diagonal(g).clone() for g in gs] if diagonal else gs


def _diag_inputs(xs):
    """A diagonal Gram diag(g) is the Gram of X = diag(sqrt(g)); the oracle's inputs."""
    return [np.diag(np.sqrt(np.einsum("ij,ij->i", x, x))) for x in xs]


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("rank_deficient", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_lora_a_matches_lstsq(diagonal, rank_deficient, weighted, dtype):
    rng = np.random.default_rng(0)
    k, r = 12, 3
    xs = _clients(rng, k, [5, 7, 30] if not rank_deficient else [3, 4, 2], rank_deficient)
    As = [rng.standard_normal((r, k)) for _ in xs]
    w = [3.0, 1.0, 0.5] if weighted else None
    ins = _diag_inputs(xs) if diagonal else xs
    expected = _oracle([a @ x for a, x in zip(As, ins)], ins, w)
    got = merge_lora_a([torch.from_numpy(a).to(dtype) for a in As], _grams(xs, diagonal), w)
    assert got.dtype == dtype and got.shape == (r, k)
    assert torch.isfinite(got).all()
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(got.double().numpy(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("rank_deficient", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_lora_b_matches_lstsq(diagonal, rank_deficient, weighted):
    rng = np.random.default_rng(1)
    k, r, d = 10, 4, 6
    xs = _clients(rng, k, [6, 9] if not rank_deficient else [2, 1], rank_deficient)
    A = rng.standard_normal((r, k))
    Bs = [rng.standard_normal((d, r)) for _ in xs]
    w = [2.0, 0.25] if weighted else None
    ins = _diag_inputs(xs) if diagonal else xs
    codes = [A @ x for x in ins]  # the B-step is a regression on the codes A X_i
    expected = _oracle([b @ c for b, c in zip(Bs, codes)], codes, w)
    got = merge_lora_b(
        [torch.from_numpy(b) for b in Bs], torch.from_numpy(A), _grams(xs, diagonal), w
    )
    assert got.shape == (d, r) and torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("diagonal", [False, True])
def test_regmean_matches_lstsq(diagonal):
    rng = np.random.default_rng(2)
    k, d = 9, 5
    xs = _clients(rng, k, [4, 20, 11])
    Ws = [rng.standard_normal((d, k)) for _ in xs]
    ins = _diag_inputs(xs) if diagonal else xs
    expected = _oracle([w @ x for w, x in zip(Ws, ins)], ins)
    got = regmean([torch.from_numpy(w) for w in Ws], _grams(xs, diagonal))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-8, rtol=1e-8)


def test_ridge_matches_augmented_lstsq():
    rng = np.random.default_rng(3)
    k, d, ridge = 8, 3, 0.1
    xs = _clients(rng, k, [3, 4])
    Ws = [rng.standard_normal((d, k)) for _ in xs]
    gs = _grams(xs)
    lam = ridge * float(sum(torch.trace(g) for g in gs)) / k
    # Ridge = one more "client" whose inputs are sqrt(lam) I and whose target is 0.
    ins = xs + [np.sqrt(lam) * np.eye(k)]
    targets = [w @ x for w, x in zip(Ws, xs)] + [np.zeros((d, k))]
    expected = _oracle(targets, ins)
    got = regmean([torch.from_numpy(w) for w in Ws], gs, ridge=ridge)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-8, rtol=1e-8)


def test_single_client_returns_its_matrices():
    rng = np.random.default_rng(4)
    k, r, d = 16, 4, 7
    x = rng.standard_normal((k, 40))
    A, B = (
        torch.from_numpy(rng.standard_normal((r, k))),
        torch.from_numpy(rng.standard_normal((d, r))),
    )
    g = torch.from_numpy(x @ x.T)
    torch.testing.assert_close(merge_lora_a([A], [g]), A)
    torch.testing.assert_close(merge_lora_b([B], A, [g]), B)
    torch.testing.assert_close(regmean([B @ A], [g]), B @ A)


def test_identical_clients_change_nothing():
    rng = np.random.default_rng(5)
    k, r = 6, 2
    A = torch.from_numpy(rng.standard_normal((r, k)))
    gs = [torch.from_numpy(x @ x.T) for x in _clients(rng, k, [10, 10, 10])]
    torch.testing.assert_close(merge_lora_a([A, A, A], gs, [1, 2, 3]), A)


def test_degenerate_grams_never_nan():
    k, r = 5, 2
    A = torch.randn(r, k, dtype=torch.float64)
    zero = torch.zeros(k, k, dtype=torch.float64)
    out = merge_lora_a([A, A], [zero, zero])
    assert torch.isfinite(out).all() and torch.count_nonzero(out) == 0
    one_token = torch.ones(k, 1, dtype=torch.float64)
    g = one_token @ one_token.T  # rank 1
    out = merge_lora_a([A, 2 * A], [g, g])
    assert torch.isfinite(out).all()
    diag_zero = torch.zeros(k, dtype=torch.float64)
    assert torch.isfinite(merge_lora_a([A], [diag_zero])).all()


def test_nearly_singular_gram_takes_pseudo_inverse():
    """A Gram that Cholesky can factor but that is singular up to round-off."""
    rng = np.random.default_rng(6)
    k = 40
    x = rng.standard_normal((k, 10))  # rank 10 < k
    s = torch.from_numpy(x @ x.T) + 1e-14 * torch.eye(k, dtype=torch.float64)
    rhs = torch.from_numpy(rng.standard_normal((3, k))) @ s
    got = psd_solve_right(rhs, s)
    expected = rhs.numpy() @ np.linalg.pinv(s.numpy(), rcond=PINV_RCOND, hermitian=True)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)


def test_smooth_gram():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    torch.testing.assert_close(smooth_gram(g, 0.5), torch.tensor([[4.0, 1.0], [1.0, 9.0]]))
    torch.testing.assert_close(smooth_gram(g, 0.0), torch.diag(torch.tensor([4.0, 9.0])))
    torch.testing.assert_close(smooth_gram(g, 1.0), g)
    torch.testing.assert_close(g, torch.tensor([[4.0, 2.0], [2.0, 9.0]]))  # input untouched
    with pytest.raises(ValueError, match="alpha"):
        smooth_gram(g, 1.5)


def test_shape_and_weight_errors():
    A = torch.randn(2, 4)
    with pytest.raises(ValueError, match="shape"):
        merge_lora_a([A], [torch.eye(3)])
    with pytest.raises(ValueError, match="weights"):
        merge_lora_a([A, A], [torch.eye(4), torch.eye(4)], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        merge_lora_a([A], [torch.eye(4)], [-1.0])


def test_weighted_mean():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(weighted_mean([a, b], [1, 3]), torch.tensor([2.5, 5.0]))


def test_anchor_picks_the_minimiser_closest_to_it():
    """With a singular S, the anchored solution is optimal too and keeps unexcited directions."""
    from lorm_flwr.math.merge import merge_from_sums

    rng = np.random.default_rng(7)
    k, r = 6, 2
    x = rng.standard_normal((k, 3))
    x[4:] = 0.0  # features 4 and 5 never fire
    g = torch.from_numpy(x @ x.T)
    anchor = torch.from_numpy(rng.standard_normal((r, k)))
    a_client = torch.from_numpy(rng.standard_normal((r, k)))
    free = merge_from_sums(a_client @ g, g)
    anchored = merge_from_sums(a_client @ g, g, anchor=anchor)
    # Same objective value: both reproduce the client's outputs on its inputs.
    torch.testing.assert_close(anchored @ g, a_client @ g)
    torch.testing.assert_close(free @ g, a_client @ g)
    torch.testing.assert_close(anchored[:, 4:], anchor[:, 4:])  # kept, not zeroed
    assert torch.count_nonzero(free[:, 4:]) == 0


def test_cross_task_factor_form_equals_dense_r_s_pinv():
    from lorm_flwr.math.merge import cross_task_factors

    rng = np.random.default_rng(8)
    d, k, r, s = 7, 12, 2, 0.5
    bs, ags, grams = [], [], []
    for t in range(3):
        x = rng.standard_normal((k, 5 + 2 * t))
        x[:2] = 0.0  # rank-deficient total Gram
        g = torch.from_numpy(x @ x.T)
        A, B = (
            torch.from_numpy(rng.standard_normal((r, k))),
            torch.from_numpy(rng.standard_normal((d, r))),
        )
        bs.append(s * B), ags.append(A @ g), grams.append(g)
    S = sum(grams)
    R = sum(b @ ag for b, ag in zip(bs, ags))  # sum_t s B_t A_t G_t
    dense = R.numpy() @ np.linalg.pinv(S.numpy(), rcond=PINV_RCOND, hermitian=True)
    b_cat, a_cat = cross_task_factors(bs, ags, S)
    assert b_cat.shape == (d, 3 * r) and a_cat.shape == (3 * r, k)
    np.testing.assert_allclose((b_cat @ a_cat).numpy(), dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_solve_whose_eigendecomposition_fails_falls_back_and_never_stops_the_server(
    monkeypatch, failing
):
    """LAPACK's eigh can fail to converge (seen on a RegMean head Gram): the merge retries on
    the scaled system, then with an SVD, then with a small ridge, instead of raising."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=gen) * 1e3
    s = x @ x.T  # rank 3 of 6: Cholesky is refused, eigh is reached
    rhs = torch.randn(2, 6, dtype=torch.float64, generator=gen)
    expected = psd_solve_right(rhs, s)
    real_eigh, real_svd, calls = torch.linalg.eigh, torch.linalg.svd, {"eigh": 0}

    def eigh(m):
        calls["eigh"] += 1
        if calls["eigh"] <= min(failing, 2):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(m)

    def svd(m, *args, **kwargs):
        if failing >= 3:
            raise torch.linalg.LinAlgError("svd failed")
        return real_svd(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    monkeypatch.setattr(torch.linalg, "svd", svd)
    got = psd_solve_right(rhs, s)
    assert torch.isfinite(got).all()
    if failing < 3:  # the same minimum-norm solution
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    else:  # the ridge's: the same on the data, X S ~ rhs S^+ S
        torch.testing.assert_close(got @ s, expected @ s, rtol=1e-3, atol=1e-6)
