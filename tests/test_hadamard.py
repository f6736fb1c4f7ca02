"""fxquant.hadamard: exact integer orthogonality of every base and of composite sizes, the fast
transform against the dense matrix, the three rotation kinds, and one test per error path."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant import hadamard_constructions as hc
from fxquant.errors import NoHadamardError, RecipeError
from fxquant.hadamard import (KINDS, MAX_BASE, hadamard_base_sizes, hadamard_construction, hadamard_matrix,
                              hadamard_transform, has_hadamard, rotation_matrix)

REQUIRED_BASES = (12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 152, 156, 172)
# real model widths -> the decomposition n = m * 2^k that the transform uses (smallest base m)
MODEL_SIZES = {576: "36 * 2^4", 1536: "12 * 2^7", 11008: "172 * 2^6", 14336: "28 * 2^9", 9728: "76 * 2^7",
               3584: "28 * 2^7", 4096: "2^12", 5120: "20 * 2^8", 8192: "2^13", 18944: "148 * 2^7",
               25600: "100 * 2^8"}
# n -> (odd part, power of two): 428, 684, 924 exceed MAX_BASE; 188 = 4 * 47 has no construction here
NO_HADAMARD = {13696: (107, 7), 10944: (171, 6), 29568: (231, 7), 752: (47, 4), 7: (7, 0)}
SUPPORTED = [n for n in range(1, 16385) if has_hadamard(n)]


def _eye(n: int, dtype=torch.int64) -> torch.Tensor:
    return torch.eye(n, dtype=dtype)


def _assert_orthogonal_int(h: torch.Tensor) -> None:
    h = h.long()
    assert torch.equal(h @ h.T, len(h) * _eye(len(h)))


def _assert_orthogonal(h: torch.Tensor, rows: list[int] | None = None) -> None:
    """H[rows] @ H.T == n I[rows] exactly in float64 (integer sums far below 2^53); all rows if None.

    For sampled rows the product is formed by the transform (x @ H.T, butterfly + base matmul, an
    independent code path from the dense Kronecker build) instead of converting all n^2 entries.
    """
    n = len(h)
    if rows is None:
        assert torch.equal(h.double() @ h.double().T, n * _eye(n, torch.float64))
        return
    got = hadamard_transform(h[rows].double(), normalize=False)
    assert torch.equal(got, n * _eye(n, torch.float64)[rows])


def _sample_rows(n: int) -> list[int]:
    picked = torch.randint(0, n, (6,), generator=torch.Generator().manual_seed(n)).tolist()
    return sorted({0, 1, n // 2, n - 1, *picked})


# ---- bases ---------------------------------------------------------------------------------

def test_base_table_is_every_multiple_of_four_but_188_and_236():
    expected = (1, 2) + tuple(m for m in range(4, MAX_BASE + 1, 4) if m not in (188, 236))
    assert hadamard_base_sizes() == expected
    assert set(REQUIRED_BASES) <= set(expected)


@pytest.mark.parametrize("m", hadamard_base_sizes())
def test_every_base_size_is_exactly_orthogonal(m):
    h = hadamard_matrix(m)
    assert h.dtype == torch.int8 and h.shape == (m, m) and set(h.unique().tolist()) <= {-1, 1}
    _assert_orthogonal_int(h)


@pytest.mark.parametrize("m", [m for m in range(1, MAX_BASE + 1) if hc.construction(m)])
def test_every_direct_construction_is_exactly_orthogonal(m):
    # includes orders the decomposition never uses as a base (152 = Paley I over GF(151), 8 over GF(7))
    _assert_orthogonal_int(hc.base_hadamard(m))


@pytest.mark.parametrize("m,name", [
    (12, "Paley I (q=11)"), (28, "Paley I (q=27)"), (244, "Paley I (q=243)"), (36, "Paley II (q=17)"),
    (52, "Paley II (q=25)"), (100, "Paley II (q=49)"),
    (156, "Goethals-Seidel of T-matrices (order 3) x Turyn-Williamson (q=25)"),
    (92, "Goethals-Seidel of searched circulants (tools/search_gs_sequences.py 23)"),
    (172, "Goethals-Seidel of searched circulants (tools/search_gs_sequences.py 43)"),
])
def test_construction_names(m, name):
    assert hc.construction(m) == name


@pytest.mark.parametrize("q", [4, 8, 9, 25, 27, 49, 243])
def test_prime_power_fields_have_a_primitive_element_and_paley_core(q):
    f = hc.Field(q)
    assert sorted(f.exp) == list(range(1, q))  # x generates GF(q)^*
    if q % 2 == 0:
        return  # Paley needs odd q: in characteristic 2 every element is a square
    jac = hc._jacobsthal(q)
    assert torch.equal(jac @ jac.T, q * _eye(q) - torch.ones(q, q, dtype=torch.int64))
    assert torch.equal(jac.T, jac if q % 4 == 1 else -jac)


@pytest.mark.parametrize("q", [5, 9, 13, 25, 41])
def test_turyn_gives_symmetric_williamson_matrices(q):
    ws = hc.turyn_williamson(q)
    m = (q + 1) // 2
    assert all(torch.equal(w, w.T) for w in ws)
    assert torch.equal(sum(w @ w for w in ws), 4 * m * _eye(m))


@pytest.mark.parametrize("order", sorted(hc._GS_SEQUENCES))
def test_searched_sequences_satisfy_the_goethals_seidel_condition(order):
    rows = [[1 if c == "+" else -1 for c in s] for s in hc._GS_SEQUENCES[order]]
    assert {len(r) for r in rows} == {order // 4}
    xs = [hc.circulant(r) for r in rows]
    assert torch.equal(sum(x @ x.T for x in xs), order * _eye(order // 4))


def test_search_script_reproduces_the_order_172_table():
    path = Path(__file__).resolve().parent.parent / "tools" / "search_gs_sequences.py"
    spec = importlib.util.spec_from_file_location("search_gs_sequences", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.solve(43, 7)
    assert tuple("".join("+" if x > 0 else "-" for x in r) for r in rows) == hc._GS_SEQUENCES[172]


# ---- composite sizes -----------------------------------------------------------------------

@pytest.mark.parametrize("n", sorted(MODEL_SIZES))
def test_model_sizes_decompose_and_are_orthogonal(n):
    assert hadamard_construction(n).startswith(MODEL_SIZES[n] + ":")
    if n <= 16384:  # a dense 25600 x 25600 int8 matrix is 650 MB
        h = hadamard_matrix(n)
        assert h.dtype == torch.int8 and h.shape == (n, n)
        _assert_orthogonal(h, _sample_rows(n))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SUPPORTED))
def test_supported_sizes_up_to_16384_are_orthogonal(n):
    h = hadamard_matrix(n)
    _assert_orthogonal(h, None if n <= 1024 else _sample_rows(n))


def test_dense_matrix_is_base_kron_sylvester():
    h12, h4 = hadamard_matrix(12), hadamard_matrix(4)
    assert torch.equal(hadamard_matrix(48), torch.kron(h12, h4))
    assert torch.equal(h4, torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]],
                                        dtype=torch.int8))


def test_hadamard_matrix_returns_a_fresh_tensor():
    hadamard_matrix(12).zero_()
    _assert_orthogonal_int(hadamard_matrix(12))


# ---- transform -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([n for n in SUPPORTED if n <= 2048]),
       lead=st.lists(st.integers(1, 3), max_size=2), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_transform_equals_dense_matmul(n, lead, normalize, seed):
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dense = x @ hadamard_matrix(n).double().T / (math.sqrt(n) if normalize else 1.0)
    torch.testing.assert_close(hadamard_transform(x, normalize=normalize), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [12, 344, 576, 1376])  # 172 * 2^k: the base is not symmetric
def test_transform_inverse_is_right_multiplication_by_q(n):
    x = torch.randn(3, n, dtype=torch.float64)
    q = hadamard_matrix(n).double() / math.sqrt(n)
    torch.testing.assert_close(hadamard_transform(x) @ q, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-1)])
def test_transform_keeps_the_input_dtype(dtype, tol):
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    y = hadamard_transform(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), hadamard_transform(x.to(dtype).double()), rtol=tol, atol=tol)


def test_transform_refuses_integer_input():
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        hadamard_transform(torch.ones(4, dtype=torch.int64))


# ---- rotations -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [48, 64, 172])
def test_every_kind_is_orthonormal_and_deterministic(kind, n):
    q = rotation_matrix(kind, n, seed=5)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    torch.testing.assert_close(q @ q.T, _eye(n, torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, rotation_matrix(kind, n, seed=5))


@pytest.mark.parametrize("kind", ["random-hadamard", "random-orthogonal"])
def test_random_kinds_differ_by_seed(kind):
    assert not torch.equal(rotation_matrix(kind, 64, seed=0), rotation_matrix(kind, 64, seed=1))


def test_random_hadamard_is_hadamard_with_column_signs():
    n = 96
    h, q = rotation_matrix("hadamard", n), rotation_matrix("random-hadamard", n, seed=3)
    signs = (q / h)[0]
    assert not torch.equal(q, h) and set(signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(q, h * signs)
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(x @ q.T, hadamard_transform(x * signs), rtol=1e-12, atol=1e-12)


def test_random_orthogonal_is_haar_qr_with_positive_r_diagonal():
    q = rotation_matrix("random-orthogonal", 50, seed=9)
    gauss = torch.randn(50, 50, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = q.T @ gauss
    torch.testing.assert_close(r.tril(-1), torch.zeros(50, 50, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (r.diagonal() > 0).all()


@pytest.mark.parametrize("n", [7, 50])
def test_random_orthogonal_works_without_a_hadamard_matrix(n):
    assert not has_hadamard(n)
    q = rotation_matrix("random-orthogonal", n, dtype=torch.float32)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.double() @ q.double().T, _eye(n, torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["hadamard", "random-hadamard"])
def test_block_size_gives_a_block_diagonal_rotation(kind):
    q = rotation_matrix(kind, 96, seed=2, block_size=12)
    block = q.abs().reshape(8, 12, 8, 12).sum((1, 3))  # mass of each 12 x 12 block
    assert torch.equal(block != 0, torch.eye(8, dtype=torch.bool))
    torch.testing.assert_close(q @ q.T, _eye(96, torch.float64), rtol=0, atol=1e-12)
    if kind == "hadamard":
        assert torch.equal(q, torch.block_diag(*[rotation_matrix("hadamard", 12)] * 8))


def test_rotations_never_touch_the_global_rng():
    state = torch.get_rng_state()
    for kind in KINDS:
        rotation_matrix(kind, 64, seed=1)
    assert torch.equal(state, torch.get_rng_state())


# ---- errors --------------------------------------------------------------------------------

_ENTRY_POINTS = {
    "hadamard_matrix": hadamard_matrix,
    "hadamard_transform": lambda n: hadamard_transform(torch.zeros(n)),
    "rotation hadamard": lambda n: rotation_matrix("hadamard", n),
    "rotation random-hadamard": lambda n: rotation_matrix("random-hadamard", n),
}


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
@pytest.mark.parametrize("n", sorted(NO_HADAMARD))
def test_unsupported_size_names_the_size_and_both_options(entry, n):
    odd, twos = NO_HADAMARD[n]
    assert not has_hadamard(n)
    with pytest.raises(NoHadamardError,
                       match=rf"size {n} .*{n} = {odd} \* 2\^{twos}.*block.*random-orthogonal.*never zero-pads"):
        _ENTRY_POINTS[entry](n)


def test_unsupported_size_lists_the_largest_block_sizes():
    with pytest.raises(NoHadamardError, match=r"block_size= one of \[128, 64, 32, 16\]"):
        hadamard_matrix(13696)


def test_odd_size_says_no_block_helps():
    with pytest.raises(NoHadamardError, match="only when 4 divides the order.*no block size helps"):
        hadamard_matrix(7)


def test_block_size_must_divide_the_size():
    with pytest.raises(RecipeError, match=r"block_size=12 must be a positive divisor of the size 64"):
        rotation_matrix("hadamard", 64, block_size=12)


def test_block_size_must_have_a_hadamard_matrix():
    with pytest.raises(NoHadamardError, match=r"block_size=6 has no Hadamard matrix.*one of \[96, 48, 32, 24\]"):
        rotation_matrix("random-hadamard", 96, block_size=6)


def test_block_size_is_refused_for_random_orthogonal():
    with pytest.raises(RecipeError, match="block_size applies to 'hadamard' and 'random-hadamard' only"):
        rotation_matrix("random-orthogonal", 64, block_size=8)


def test_unknown_kind_lists_the_kinds():
    kinds = r"\['hadamard', 'random-hadamard', 'random-orthogonal'\]"
    with pytest.raises(RecipeError, match=rf"'haar' is not one of {kinds}"):
        rotation_matrix("haar", 64)


def test_size_must_be_positive():
    with pytest.raises(RecipeError, match="rotation size must be a positive integer, got 0"):
        rotation_matrix("random-orthogonal", 0)
    with pytest.raises(NoHadamardError, match="Hadamard size must be a positive integer, got 0"):
        hadamard_matrix(0)


@pytest.mark.parametrize("kind,n,block", [("hadamard", 576, None), ("random-hadamard", 576, None),
                                          ("random-hadamard", 192, 64), ("random-orthogonal", 50, None),
                                          ("hadamard", 172, None), ("random-hadamard", 2304, None), ("hadamard", 4096, 2048),
                                          ("hadamard", 3072, 1536)])
def test_rotation_operator_equals_the_dense_product(kind, n, block):
    from fxquant.hadamard import rotation_operator

    x = torch.randn(3, 2, n, dtype=torch.float64)
    q = rotation_matrix(kind, n, seed=4, block_size=block)
    torch.testing.assert_close(rotation_operator(kind, n, seed=4, block_size=block)(x), x @ q, rtol=0, atol=1e-12)


def test_transposed_transform_inverts_the_normalized_one():
    x = torch.randn(4, 1536, dtype=torch.float64)  # 12 * 2^7
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), transpose=True), x)
