"""Search four circulant ±1 sequences of prime length v for a Goethals–Seidel Hadamard matrix of order 4v.

Reproduces the sequence tables in fxquant/hadamard_constructions.py (`_GS_SEQUENCES`). Usage:
    python tools/search_gs_sequences.py 43 [--subgroup-order 7]
The idea (orbit reduction, as in Djokovic's searches for supplementary difference sets): look only
at sequences constant on the orbits of a subgroup S of the units of Z_v acting by multiplication.
Their periodic autocorrelations (PAF) are constant on the same orbits, so the Goethals–Seidel
condition PAF_a(s) + PAF_b(s) + PAF_c(s) + PAF_d(s) = 0 (s != 0) is one equation per orbit. A
meet-in-the-middle over the pairs (a, b) and (c, d) then solves it. The enumeration order is fixed,
so the first solution printed is the same on every run. Every solution is checked by building the
Goethals–Seidel matrix and asserting H H^T = 4v I in integers.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from fxquant import hadamard_constructions as hc


def primitive_root(v: int) -> int:
    """The smallest generator of the multiplicative group of Z_v (v prime)."""
    factors = [r for r in range(2, v) if (v - 1) % r == 0 and all(r % s for s in range(2, r))]
    return next(g for g in range(2, v) if all(pow(g, (v - 1) // r, v) != 1 for r in factors))


def orbits(v: int, h: int) -> list[list[int]]:
    """{0} followed by the cosets of the order-h subgroup of Z_v^*, each sorted, ordered by least element."""
    g = primitive_root(v)
    sub = {pow(g, (v - 1) // h * i, v) for i in range(h)}
    seen, out = set(), [[0]]
    for x in range(1, v):
        if x not in seen:
            orbit = sorted(x * s % v for s in sub)
            seen.update(orbit)
            out.append(orbit)
    return out


def candidates(v: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All orbit-constant ±1 sequences with x[0] = +1, and their PAF at one shift per nonzero orbit."""
    orbs = orbits(v, h)
    reps = torch.tensor([o[0] for o in orbs[1:]])
    signs = torch.tensor(list(itertools.product((1, -1), repeat=len(orbs) - 1)))
    seqs = torch.ones(len(signs), v, dtype=torch.int64)
    for j, orbit in enumerate(orbs[1:]):
        seqs[:, orbit] = signs[:, j:j + 1]
    paf = torch.stack([(seqs * seqs.roll(-int(s), dims=1)).sum(1) for s in reps], dim=1)
    return seqs, paf


def solve(v: int, h: int) -> list[list[int]] | None:
    """The first (a, b, c, d) with PAF_a + PAF_b + PAF_c + PAF_d = 0 off zero, or None.

    Candidates whose power spectrum exceeds 4v anywhere cannot be part of a solution and are
    dropped first. Pair sums are hashed by a fixed random projection; hits are checked exactly.
    """
    seqs, paf = candidates(v, h)
    keep = (torch.fft.fft(seqs.double()).abs() ** 2).amax(1) <= 4 * v + 1e-6
    seqs, paf = seqs[keep], paf[keep]
    i, j = torch.triu_indices(len(seqs), len(seqs))
    sums = paf[i] + paf[j]
    weights = torch.randint(-2**62, 2**62, (paf.shape[1],), generator=torch.Generator().manual_seed(0))
    keys = (sums * weights).sum(1)
    order = keys.argsort(stable=True)
    sorted_keys = keys[order]
    pos = torch.searchsorted(sorted_keys, -keys).clamp(max=len(keys) - 1)
    for p in torch.nonzero(sorted_keys[pos] == -keys).flatten().tolist():
        q = int(order[pos[p]])
        if torch.equal(sums[p], -sums[q]):
            return [seqs[k].tolist() for k in (int(i[p]), int(j[p]), int(i[q]), int(j[q]))]
    return None


def goethals_seidel(rows: list[list[int]]) -> torch.Tensor:
    """The Goethals–Seidel array filled with the circulants of the four first rows (fxquant's own builder)."""
    return hc.goethals_seidel(*(hc.circulant(r) for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("v", type=int, help="prime order of the circulants (the Hadamard order is 4v)")
    parser.add_argument("--subgroup-order", type=int, nargs="*",
                        help="orders to try (default: all proper divisors of v-1, largest first)")
    args = parser.parse_args(argv)
    v = args.v
    orders = args.subgroup_order or [h for h in range(v - 2, 1, -1) if (v - 1) % h == 0]
    for h in orders:
        if 2 ** ((v - 1) // h) > 1 << 15:
            print(f"v={v} h={h}: {2 ** ((v - 1) // h)} candidates per sequence, too many for this search; skipped")
            continue
        rows = solve(v, h)
        print(f"v={v} h={h}: {'found' if rows else 'none'}")
        if rows:
            hm = goethals_seidel(rows)
            assert torch.equal(hm @ hm.T, 4 * v * torch.eye(4 * v, dtype=torch.int64))
            for r in rows:
                print('    "' + "".join("+" if x > 0 else "-" for x in r) + '",')
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
