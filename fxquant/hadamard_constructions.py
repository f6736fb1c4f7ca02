"""Integer Hadamard matrices of the base orders m that `fxquant.hadamard` combines with 2^k.

Entry points: `construction(m)` names the direct construction of order m (None if there is none)
and `base_hadamard(m)` builds it, cached, as an int64 tensor with H H^T = m I.
The one idea: every base comes from finite-field algebra. Paley I and II use the quadratic
character of GF(q); Turyn's Williamson matrices use the projective line over GF(q) seen inside
GF(q^2); they fill the Goethals–Seidel array, alone or through T-matrices. Three orders no field
reaches (92, 116, 172) fill the same array with circulants whose first rows were found by
tools/search_gs_sequences.py and are stored below as data.
"""
from __future__ import annotations

import functools

import torch

# Four circulant first rows (a, b, c, d) of prime order v with sum of X X^T = 4v I, keyed by 4v.
# Found by `python tools/search_gs_sequences.py v` (first solution of an orbit-reduced
# meet-in-the-middle search; a few seconds each): v = 23 and 29 are symmetric, i.e. Williamson
# matrices (sequences constant on the orbits {i, -i}); v = 43 is constant on the cosets of the
# order-7 subgroup {1, 4, 11, 16, 21, 35, 41} of Z_43^*. The script and tests/test_hadamard.py
# both check H H^T = 4v I in integers.
_GS_SEQUENCES = {
    92: ("+++++-++---++---++-++++",
         "+-+++--++-+--+-++--+++-",
         "+-+--+++++----+++++--+-",
         "+--++-+-+------+-+-++--"),
    116: ("+++++++---+-++--++-+---++++++",
          "++++---+++-+--++--+-+++---+++",
          "++-+++---+--+-++-+--+---+++-+",
          "+-+-++---+--+-++-+--+---++-+-"),
    172: ("++++++--+--++---+--++++----+----++-+-+-+-++",
          "+++-+--++--+----+-+--++---+++++-+-++---+-++",
          "+++-+--++--+----+-+--++---+++++-+-++---+-++",
          "++--+--+---+----+-+--+----+-+++---++-----+-"),
}


# ---- GF(p^k) -------------------------------------------------------------------------------

def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q, k = q // p, k + 1
    return (p, k) if q == 1 else None


def _digits(a: int, p: int, k: int) -> list[int]:
    return [a // p ** j % p for j in range(k)]


def _powers_of_x(low: list[int], p: int, k: int) -> list[int] | None:
    """x^0 .. x^(q-2) modulo f = x^k + sum(low[j] x^j), encoded base p; None unless x has order q-1.

    Order q-1 means the q-1 nonzero residues are all powers of x, hence units: f is irreducible.
    """
    one = [1] + [0] * (k - 1)
    cur, out = one, []
    for _ in range(p ** k - 1):
        out.append(sum(c * p ** j for j, c in enumerate(cur)))
        top = cur[-1]
        cur = [(s - top * c) % p for s, c in zip([0] + cur[:-1], low)]  # x * cur, x^k -> -low
        if cur == one:
            break
    return out if len(out) == p ** k - 1 and cur == one else None


class Field:
    """GF(q), q = p^k: elements are ints 0..q-1 whose base-p digits are polynomial coefficients.

    The modulus is the first monic degree-k polynomial (coefficients in counting order) whose root
    x generates the multiplicative group, so `exp[i]` = x^i and `log` invert each other.
    """

    def __init__(self, q: int):
        self.q = q
        self.p, self.k = prime_power(q)
        self.exp = self._primitive_powers()
        self.log = [0] * q
        for i, e in enumerate(self.exp):
            self.log[e] = i

    def _primitive_powers(self) -> list[int]:
        for code in range(self.q):  # the low coefficients of f, as a base-p number
            if code % self.p:  # f(0) != 0, else x is not a unit
                powers = _powers_of_x(_digits(code, self.p, self.k), self.p, self.k)
                if powers:
                    return powers
        raise AssertionError(f"GF({self.q}) has no primitive polynomial: impossible for a prime power")

    def sub(self, a: int, b: int) -> int:
        """a - b, digit by digit modulo p."""
        p, k = self.p, self.k
        return sum((x - y) % p * p ** j for j, (x, y) in enumerate(zip(_digits(a, p, k), _digits(b, p, k))))

    def character(self) -> torch.Tensor:
        """The quadratic character chi of every element: 0 at 0, +1 on squares (even log), -1 else."""
        chi = torch.tensor([1 - 2 * (i % 2) for i in self.log])
        chi[0] = 0
        return chi


@functools.lru_cache(maxsize=None)
def _field(q: int) -> Field:
    return Field(q)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q): Q Q^T = q I - J and Q J = 0; Q^T = chi(-1) Q."""
    f = _field(q)
    digits = torch.tensor([_digits(a, f.p, f.k) for a in range(q)])
    weights = torch.tensor([f.p ** j for j in range(f.k)])
    diff = ((digits[:, None, :] - digits[None, :, :]) % f.p) @ weights  # the element a - b
    return f.character()[diff]


# ---- Paley ---------------------------------------------------------------------------------

def _core(q: int, sign: int) -> torch.Tensor:
    """The conference matrix [[0, 1^T], [sign * 1, Q]] of order q + 1 (C C^T = q I)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, sign, _jacobsthal(q)
    return c


def paley_1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime power q = 3 (mod 4): H = I + C with C skew."""
    return torch.eye(q + 1, dtype=torch.int64) + _core(q, -1)


def paley_2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime power q = 1 (mod 4): [[C + I, C - I], [C - I, -C - I]], C symmetric."""
    c, i = _core(q, 1), torch.eye(q + 1, dtype=torch.int64)
    return torch.cat([torch.cat([c + i, c - i], 1), torch.cat([c - i, -c - i], 1)], 0)


# ---- Goethals–Seidel array, Williamson and T-matrices --------------------------------------

def circulant(row: list[int]) -> torch.Tensor:
    """The circulant matrix X[i, j] = row[(j - i) mod v]."""
    r = torch.tensor(row, dtype=torch.int64)
    return torch.stack([r.roll(i) for i in range(len(row))])


def goethals_seidel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Order 4v from commuting group-developed blocks with A A^T + B B^T + C C^T + D D^T = 4v I.

    R (the back identity) turns each block X into a symmetric X R; that is what makes the cross
    terms cancel. Blocks must be circulant, or Kronecker products of circulants.
    """
    r = torch.eye(len(a), dtype=torch.int64).flip(1)
    return torch.cat([
        torch.cat([a, b @ r, c @ r, d @ r], 1),
        torch.cat([-b @ r, a, d.T @ r, -c.T @ r], 1),
        torch.cat([-c @ r, -d.T @ r, a, b.T @ r], 1),
        torch.cat([-d @ r, c.T @ r, -b.T @ r, a], 1),
    ], 0)


def _projective_character(q: int, i: int, j: int) -> int:
    """chi_q(D(w^i, w^j)) for the alternating form D(x, y) = (x y^q - x^q y) / w^((q+1)/2) on GF(q^2).

    D takes values in GF(q); w^(q+1) generates GF(q)^*, so chi_q(z) = (-1)^(log_w(z) / (q+1)).
    """
    f, order = _field(q * q), q * q - 1
    z = f.sub(f.exp[(i + q * j) % order], f.exp[(q * i + j) % order])
    if z == 0:
        return 0
    return 1 - 2 * ((f.log[z] - (q + 1) // 2) % order // (q + 1) % 2)


def turyn_williamson(q: int) -> tuple[torch.Tensor, ...]:
    """Williamson matrices (A + I, A - I, B, B) of order m = (q + 1) / 2, q = 1 (mod 4) a prime power.

    Turyn (1972): s = w^(q+3) permutes the q + 1 points of the projective line over GF(q) in two
    m-cycles {s^a} and {w s^a}, so the symmetric conference matrix chi(D(x, y)) is [[A, B], [B, -A]]
    in circulant blocks, A^2 + B^2 = q I. Starting the second cycle at w s^((m-1)/2) makes B symmetric.
    """
    m, s, c = (q + 1) // 2, q + 3, (q - 1) // 4
    a = circulant([_projective_character(q, 0, s * d) for d in range(m)])
    b = circulant([_projective_character(q, 0, 1 + s * (d + c)) for d in range(m)])
    i = torch.eye(m, dtype=torch.int64)
    return a + i, a - i, b, b


def cooper_wallis(xs: tuple[torch.Tensor, ...], ws: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Four blocks of order t*w from T-matrices X1..X4 (order t) and Williamson matrices W1..W4 (order w).

    Sum of Y Y^T = (sum X X^T) x (sum W W^T) = t I x 4w I: the cross terms cancel because
    Williamson matrices are symmetric and commute. Feed the result to `goethals_seidel`.
    """
    (x1, x2, x3, x4), (a, b, c, d) = xs, ws
    k = torch.kron
    return (k(x1, a) + k(x2, b) + k(x3, c) + k(x4, d),
            -k(x1, b) + k(x2, a) + k(x3, d) - k(x4, c),
            -k(x1, c) - k(x2, d) + k(x3, a) + k(x4, b),
            -k(x1, d) + k(x2, c) - k(x3, b) + k(x4, a))


def _t_matrices_3() -> tuple[torch.Tensor, ...]:
    """T-matrices of order 3: I, P, P^2 (P the cyclic shift) and 0; disjoint, summing to J, sum X X^T = 3 I."""
    rows = ([1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0])
    return tuple(circulant(r) for r in rows)


def _searched(m: int) -> torch.Tensor:
    rows = [[1 if ch == "+" else -1 for ch in seq] for seq in _GS_SEQUENCES[m]]
    return goethals_seidel(*(circulant(r) for r in rows))


# ---- the table -----------------------------------------------------------------------------

def _paley_1_q(m: int) -> int | None:
    q = m - 1
    return q if q % 4 == 3 and prime_power(q) else None


def _paley_2_q(m: int) -> int | None:
    q = m // 2 - 1
    return q if m % 8 == 4 and q % 4 == 1 and prime_power(q) else None


def _t3_williamson_q(m: int) -> int | None:
    q = m // 6 - 1  # m = 4 * 3 * w with w = (q + 1) / 2
    return q if m % 24 == 12 and q % 4 == 1 and prime_power(q) else None


def construction(m: int) -> str | None:
    """A short name of the direct construction of order m, or None (doubling is not direct)."""
    if m == 1:
        return "trivial [1]"
    if (q := _paley_1_q(m)) is not None:
        return f"Paley I (q={q})"
    if (q := _paley_2_q(m)) is not None:
        return f"Paley II (q={q})"
    if (q := _t3_williamson_q(m)) is not None:
        return f"Goethals-Seidel of T-matrices (order 3) x Turyn-Williamson (q={q})"
    if m in _GS_SEQUENCES:
        return f"Goethals-Seidel of searched circulants (tools/search_gs_sequences.py {m // 4})"
    return None


@functools.lru_cache(maxsize=None)
def base_hadamard(m: int) -> torch.Tensor:
    """The int64 Hadamard matrix of order m named by `construction(m)`; cached and shared: do not modify."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    if (q := _paley_1_q(m)) is not None:
        return paley_1(q)
    if (q := _paley_2_q(m)) is not None:
        return paley_2(q)
    if (q := _t3_williamson_q(m)) is not None:
        return goethals_seidel(*cooper_wallis(_t_matrices_3(), turyn_williamson(q)))
    if m in _GS_SEQUENCES:
        return _searched(m)
    raise ValueError(f"no direct construction of a Hadamard matrix of order {m}; check construction(m) first")
