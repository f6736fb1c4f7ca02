"""The quantization format: one frozen, hashable value for how a tensor's integer codes are read.

Entry point: `QuantFormat(bits, symmetric, group_size=None, zero_point="float")`, which the numerics
(`fxquant.quant.numerics`), the GPTQ solver, the packed `QuantizedLinear` and the configs that
name a weight quantizer all take instead of loose arguments; kernels dispatch on it. The one idea:
a format is checked once, when built (`check_format` names the config a bad field came from), and
normalised, so two formats that read codes the same way compare and hash equal: a symmetric format
has no zero point to choose (its codes are signed around an integer zero fixed at 0), so its
`zero_point` is always "int". Pure data: no torch, no fx.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxquant.errors import RecipeError

BITS = (2, 3, 4, 8)
ZERO_POINTS = ("float", "int")  # asymmetric: tinygemm's float zero (x = q*s + z) or an integer one (x = (u - z)*s)
MAX_GROUP = 2 ** 20


def one_of(owner: str, field: str, value, allowed) -> None:
    """Raise RecipeError unless `value` is one of `allowed`, of the same type (a config check)."""
    # exact types too: 8.0 == 8 and True == 1 in Python, but a config of bits=8.0 is a typo
    if value not in allowed or type(value) not in {type(a) for a in allowed}:
        raise RecipeError(f"{owner}.{field} = {value!r} is not one of {list(allowed)}")


def int_in(owner: str, field: str, value, lo: int, hi: int) -> None:
    """Raise RecipeError unless `value` is an integer (not a bool) in [lo, hi] (a config check)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RecipeError(f"{owner}.{field} = {value!r} must be an integer in [{lo}, {hi}]")


def check_format(fields, owner: str) -> None:
    """Check the format fields (`bits`, `symmetric`, `group_size`, `zero_point`) of `fields`, a
    QuantFormat or a config that carries them; errors name `owner` (the config class)."""
    one_of(owner, "bits", fields.bits, BITS)
    one_of(owner, "symmetric", fields.symmetric, (True, False))
    if fields.group_size is not None:
        int_in(owner, "group_size", fields.group_size, 1, MAX_GROUP)
    one_of(owner, "zero_point", fields.zero_point, ZERO_POINTS)


@dataclass(frozen=True)
class QuantFormat:
    """`bits`-bit integer codes, symmetric or not, one scale per output channel (`group_size` None)
    or per `group_size` consecutive inputs; asymmetric codes use a float zero ("float": the tinygemm
    / FBGEMM int4 format) or an integer one ("int", with 0 exactly representable).

    Example::

        QuantFormat(4, False, 64).describe()             # 'int4 asym float-zero group 64'
        QuantFormat(8, True, zero_point="float")          # == QuantFormat(8, True, None, "int")
    """

    bits: int
    symmetric: bool
    group_size: int | None = None  # None: one scale per output channel (per token for activations)
    zero_point: str = "float"

    def __post_init__(self):
        check_format(self, "QuantFormat")
        if self.symmetric:  # no zero point to choose: one spelling, so equal formats compare equal
            object.__setattr__(self, "zero_point", "int")

    @classmethod
    def from_float_zero(cls, bits: int, symmetric: bool, group_size: int | None, float_zero: bool) -> QuantFormat:
        """The format the primitive spelling names (op schemas, saved layer specs): `group_size` 0 or
        None is per channel, `float_zero` True is the float zero point, False an integer one."""
        return cls(bits, symmetric, group_size or None, "float" if float_zero else "int")

    @property
    def float_zero(self) -> bool:
        """Asymmetric with a float zero point: x = q * scale + zero (q signed, from the group min)."""
        return not self.symmetric and self.zero_point == "float"

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of a code: signed [-2^(b-1), 2^(b-1)-1] for symmetric and float-zero formats,
        unsigned [0, 2^b-1] with an integer zero point."""
        if self.symmetric or self.float_zero:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def describe(self) -> str:
        """`int4 asym float-zero group 64` / `int8 sym per channel`: the format in words."""
        how = f"group {self.group_size}" if self.group_size else "per channel"
        zero = "sym" if self.symmetric else ("asym float-zero" if self.float_zero else "asym")
        return f"int{self.bits} {zero} {how}"
