"""Hadamard, random-Hadamard and random-orthogonal rotations, and the fast Hadamard transform.

Entry points: `hadamard_matrix(n)`, `rotation_matrix(kind, n, ...)`, `hadamard_transform(x)`,
`kronecker_hadamard(x)` (the online transform's arithmetic), `has_hadamard(n)`,
`hadamard_base_sizes()`, `hadamard_construction(n)`.
The one idea: n = m * 2^k with the smallest base m <= MAX_BASE that fxquant can build
(`hadamard_constructions`: Paley, Williamson, Goethals–Seidel over finite fields), and
H_n = H_m (x) H_{2^k} (Kronecker, Sylvester factor inner). The transform applies H_{2^k} as an
O(n log n) butterfly over contiguous chunks of 2^k and H_m as a small m x m matmul; the dense
matrix is defined with the same ordering, so the two agree exactly. Online (on activations, in
float32) the transform is `kronecker_hadamard`: H_{2^k} split into Sylvester factors, three small
GEMMs per row; the reference op and every CPU kernel run exactly it, so a 4-bit quantizer after it
sees the same bits whichever runs. Sizes with no base in reach
raise NoHadamardError naming the block-diagonal and random-orthogonal alternatives; nothing is
ever zero-padded.
"""
from __future__ import annotations

import functools
import math

import torch

from fxquant.errors import NoHadamardError, RecipeError
from fxquant.hadamard_constructions import base_hadamard, construction

KINDS = ("hadamard", "random-hadamard", "random-orthogonal")
MAX_BASE = 256  # the largest base order m built: keeps the m x m factor small enough for a fused kernel


def _odd_part(n: int) -> tuple[int, int]:
    """(o, a) with n = o * 2^a and o odd."""
    a = (n & -n).bit_length() - 1
    return n >> a, a


@functools.lru_cache(maxsize=None)
def _decompose(n: int) -> tuple[int, int] | None:
    """(m, k) with n = m * 2^k and m the smallest base <= MAX_BASE with a direct construction; else None."""
    if n < 1:
        return None
    for k in range(_odd_part(n)[1], -1, -1):
        m = n >> k
        if m > MAX_BASE:
            return None
        if construction(m) is not None:
            return m, k
    return None


def has_hadamard(n: int) -> bool:
    """Whether `hadamard_matrix(n)` and `hadamard_transform` on n features succeed."""
    return _decompose(n) is not None


def hadamard_base_sizes() -> tuple[int, ...]:
    """Every order m <= MAX_BASE with a Hadamard matrix here (1, 2, 4, 8, 12, ...); any m * 2^k works too."""
    return tuple(m for m in range(1, MAX_BASE + 1) if has_hadamard(m))


def hadamard_construction(n: int) -> str:
    """How the matrix of order n is built, e.g. "172 * 2^6: Goethals-Seidel of searched circulants (...)"."""
    m, k = _require(n)
    if m == 1:
        return f"2^{k}: Sylvester"
    return f"{m} * 2^{k}: {construction(m)}, Sylvester for 2^k" if k else f"{m}: {construction(m)}"


def _divisors_with_hadamard(n: int) -> list[int]:
    """Divisors d > 1 of n that have a Hadamard matrix, largest first."""
    return [d for d in range(n, 1, -1) if n % d == 0 and has_hadamard(d)]


def _why_none(n: int) -> str:
    """'n = o * 2^a, and <the reason no base is in reach>'."""
    odd, twos = _odd_part(n)
    head = f"{n} = {odd} * 2^{twos}"
    if odd > 1 and twos < 2:
        return f"{head}, and a Hadamard matrix of order > 2 exists only when 4 divides the order"
    base = f"{4 * odd} = 4 * {odd} (or {8 * odd}, ...)"
    if 4 * odd > MAX_BASE:
        return f"{head}, so it needs a base Hadamard matrix of order {base}, above the largest base built ({MAX_BASE})"
    return (f"{head}, so it needs a base Hadamard matrix of order {base}, and none of the constructions "
            f"(Sylvester, Paley I/II, Williamson/Goethals-Seidel, searched tables) reaches one")


def _block_hint(n: int) -> str:
    blocks = _divisors_with_hadamard(n)[:4]
    if not blocks:
        return f"no divisor of {n} above 1 has a Hadamard matrix, so no block size helps"
    return f"block_size= one of {blocks} (the largest divisors of {n} that have one)"


def _no_hadamard_message(n: int) -> str:
    return (f"No Hadamard matrix of size {n} is known to fxquant: {_why_none(n)}. Options: (1) a "
            f"block-diagonal Hadamard I_(n/b) x H_b, {_block_hint(n)}; (2) rotation=\"random-orthogonal\" "
            f"(a Haar-random orthogonal matrix of any size, applied as a dense matmul). "
            f"fxquant never zero-pads a rotation.")


def _require(n: int) -> tuple[int, int]:
    """`_decompose(n)`, or NoHadamardError naming the size and both ways out."""
    if not isinstance(n, int) or n < 1:
        raise NoHadamardError(f"Hadamard size must be a positive integer, got {n!r}")
    found = _decompose(n)
    if found is None:
        raise NoHadamardError(_no_hadamard_message(n))
    return found


@functools.lru_cache(maxsize=16)
def _sylvester(k: int) -> torch.Tensor:
    """H_{2^k} = [[S, S], [S, -S]] doubled k times (int8, symmetric); entry (i, j) = (-1)^popcount(i & j)."""
    s = torch.ones(1, 1, dtype=torch.int8)
    for _ in range(k):
        s = torch.cat([torch.cat([s, s], 1), torch.cat([s, -s], 1)], 0)
    return s


def hadamard_matrix(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order n as int8 (H @ H.T == n I), H = kron(H_m, H_{2^k}).

    int8 keeps a 14336 x 14336 matrix at 200 MB; cast (`.long()`, `.double()`) before matmuls.
    Example::

        >>> h = hadamard_matrix(12).long()                       # Paley I over GF(11)
        >>> torch.equal(h @ h.T, 12 * torch.eye(12, dtype=torch.long))
        True
    """
    m, k = _require(n)
    # H_{2^k} = H_{2^a} (x) H_{2^(k-a)}: two Kronecker products with small factors are the fast build
    return torch.kron(torch.kron(base_hadamard(m).to(torch.int8), _sylvester(k // 2)), _sylvester(k - k // 2))


def _butterfly(y: torch.Tensor) -> torch.Tensor:
    """y @ H_{2^k} along the last dim (length 2^k): k stages of (a, b) -> (a + b, a - b)."""
    lead, size = y.shape[:-1], y.shape[-1]
    h = 1
    while h < size:
        y = y.reshape(*lead, size // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, size)


def hadamard_transform(x: torch.Tensor, *, normalize: bool = True, transpose: bool = False) -> torch.Tensor:
    """y = x @ H.T (divided by sqrt(n) when `normalize`) over the last dim, n = x.shape[-1], in O(n log n + n m).

    With x viewed as [..., m, 2^k]: Y = H_m @ (X @ H_{2^k}). Half types compute in float32; the
    result has x's dtype. `transpose=True` gives y = x @ H instead (Y = H_m^T @ X H_{2^k}), which
    is also the inverse of the normalized transform.
    Example::

        >>> x = torch.randn(3, 576, dtype=torch.float64)            # 576 = 36 * 2^4
        >>> h = hadamard_matrix(576).double()
        >>> torch.allclose(hadamard_transform(x), x @ h.T / 24)
        True
    """
    m, k = _require(x.shape[-1])
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}; cast it first (x.float())")
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = _butterfly(work.reshape(*x.shape[:-1], m, 1 << k))
    if m > 1:
        base = base_hadamard(m).to(device=y.device, dtype=y.dtype)
        y = (base.T if transpose else base) @ y
    y = y.reshape(x.shape)
    if normalize:
        y = y * (1.0 / math.sqrt(x.shape[-1]))
    return y.to(x.dtype)


def _check_rotation_args(kind: str, n: int, block_size: int | None) -> int:
    """Validate before building anything; return the block order b (n when no block_size)."""
    if kind not in KINDS:
        raise RecipeError(f"rotation kind {kind!r} is not one of {list(KINDS)}")
    if not isinstance(n, int) or n < 1:
        raise RecipeError(f"rotation size must be a positive integer, got {n!r}")
    if block_size is None:
        if kind != "random-orthogonal":
            _require(n)
        return n
    if kind == "random-orthogonal":
        raise RecipeError("block_size applies to 'hadamard' and 'random-hadamard' only; "
                          "drop it for 'random-orthogonal' (any size works)")
    if not isinstance(block_size, int) or block_size < 1 or n % block_size:
        raise RecipeError(f"block_size={block_size!r} must be a positive divisor of the size {n}; "
                          f"divisors with a Hadamard matrix: {_divisors_with_hadamard(n)[:6]}")
    if not has_hadamard(block_size):
        raise NoHadamardError(f"block_size={block_size} has no Hadamard matrix: {_why_none(block_size)}. "
                              f"Use {_block_hint(n)}, or rotation=\"random-orthogonal\".")
    return block_size


def check_rotation(kind: str, n: int, block_size: int | None = None) -> None:
    """Raise the error `rotation_matrix(kind, n, block_size=...)` would raise, without building anything."""
    _check_rotation_args(kind, n, block_size)


def _haar(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal Q: QR of a Gaussian, columns signed so that R's diagonal is positive."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)


def rotation_matrix(kind: str, n: int, *, seed: int = 0, block_size: int | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal [n, n] matrix Q (Q @ Q.T == I), built in float64 and cast to `dtype`.

    "hadamard": H / sqrt(n). "random-hadamard": H diag(s) / sqrt(n), random signs s on the columns,
    so x @ Q.T == hadamard_transform(x * s). "random-orthogonal": Haar-random, any n.
    `block_size=b` gives I_(n/b) (x) Q_b (the signs of random-hadamard still span all n).
    Seeded by a local generator: the same (kind, n, seed, block_size) gives the same matrix.
    Example::

        >>> q = rotation_matrix("random-hadamard", 64, seed=3)
        >>> torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64))
        True
    """
    b = _check_rotation_args(kind, n, block_size)
    gen = torch.Generator().manual_seed(seed)
    if kind == "random-orthogonal":
        return _haar(n, gen).to(dtype)
    q = hadamard_matrix(b).double() / math.sqrt(b)
    if b != n:
        q = torch.block_diag(*[q] * (n // b))
    if kind == "random-hadamard":
        q = q * _random_signs(n, gen)
    return q.to(dtype)


def _random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    """The +-1 column signs of a random Hadamard: one draw, shared by the dense matrix and the
    transform so the two agree for every (n, seed)."""
    return 2.0 * torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) - 1.0


DENSE_UP_TO = 1024  # below this a GEMM with the dense Q beats the butterfly's k passes over memory (CPU, measured)


def rotation_operator(kind: str, n: int, *, seed: int = 0, block_size: int | None = None):
    """x -> x @ rotation_matrix(kind, n, ...) over the last dim: what folding a rotation needs.

    Blocks up to DENSE_UP_TO use the dense matrix (one GEMM); larger Hadamard blocks use the
    O(n log n) transform, so a 14336-wide model never builds a dense 14336^2 float64 matrix.
    Equals the dense product (tested).
    """
    b = _check_rotation_args(kind, n, block_size)
    if kind == "random-orthogonal" or b <= DENSE_UP_TO:
        q = rotation_matrix(kind, n, seed=seed, block_size=block_size)
        return lambda x: x @ q.to(device=x.device, dtype=x.dtype)
    signs = _random_signs(n, torch.Generator().manual_seed(seed)) if kind == "random-hadamard" else None

    def apply(x: torch.Tensor) -> torch.Tensor:
        y = hadamard_transform(x.reshape(*x.shape[:-1], n // b, b), transpose=True).reshape(x.shape)
        return y if signs is None else y * signs.to(device=x.device, dtype=x.dtype)

    return apply


MAX_FACTOR = 128  # a 128 x 128 factor is 64 KB in float32: one GEMM per axis stays in cache (CPU, measured)


@functools.lru_cache(maxsize=64)
def kronecker_factors(n: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(H_m or None, H_A, H_B) in `dtype` on `device`, with H_{2^k} = H_A (x) H_B (Sylvester, B at
    most MAX_FACTOR) and the 1/sqrt(n) normalisation folded into H_B."""
    m, k = _require(n)
    a = max(0, k - int(math.log2(MAX_FACTOR)))
    base = base_hadamard(m).to(device=device, dtype=dtype) if m > 1 else None
    h_a = _sylvester(a).to(device=device, dtype=dtype)
    h_b = (_sylvester(k - a).double() / math.sqrt(n)).to(device=device, dtype=dtype)
    return base, h_a, h_b


def kronecker_hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H^T / sqrt(n) over the last dim as three small GEMMs (x viewed as [..., m, A, B]:
    Y = H_m . (H_A . (X H_B))), in x's dtype (half types compute in float32): the online Hadamard's
    arithmetic, equal to `hadamard_transform` in exact arithmetic, a last float bit apart from it."""
    n = x.shape[-1]
    if not x.is_floating_point():
        raise TypeError(f"kronecker_hadamard needs a floating-point tensor, got {x.dtype}; cast it first (x.float())")
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    base, h_a, h_b = kronecker_factors(n, work.device, work.dtype)
    a, b = h_a.shape[0], h_b.shape[0]
    y = work.reshape(-1, n // (a * b), a, b) @ h_b  # Sylvester factors are symmetric: H^T = H
    if a > 1:
        y = h_a @ y
    if base is not None:
        y = base @ y.reshape(-1, base.shape[0], a * b)
    return y.reshape(x.shape).to(x.dtype)
