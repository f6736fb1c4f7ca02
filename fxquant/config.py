"""Pass configurations: frozen dataclasses, validated when built, serialised through an allow-list.

Entry points: the `*Config` classes, `config_from_dict(cls, fields)` and `config_to_dict(cfg)`.
The one idea: a config is plain data checked at construction (a bad value fails before any model
is touched, with the allowed values in the message), and it round-trips to a dict / TOML table
keyed by `_type`, resolved through `CONFIG_TYPES`, never by pickle or import paths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fxquant.errors import RecipeError

ROTATION_KINDS = ("hadamard", "random-hadamard", "random-orthogonal")  # = fxquant.hadamard.KINDS
PRECISIONS = ("float64", "float32")
ZERO_POINTS = ("float", "int")  # asymmetric weights: tinygemm's float zero (x = q*s + z) or an integer one


def _one_of(owner: str, field: str, value, allowed) -> None:
    # exact types too: 8.0 == 8 and True == 1 in Python, but a config of bits=8.0 is a typo
    if value not in allowed or type(value) not in {type(a) for a in allowed}:
        raise RecipeError(f"{owner}.{field} = {value!r} is not one of {list(allowed)}")


def _int_in(owner: str, field: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RecipeError(f"{owner}.{field} = {value!r} must be an integer in [{lo}, {hi}]")


def _ratio(owner: str, field: str, value, lo_open: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (0 < value if lo_open else 0 <= value) \
        and value <= 1
    if not ok:
        raise RecipeError(f"{owner}.{field} = {value!r} must be in {'(0' if lo_open else '[0'}, 1]")


@dataclass(frozen=True)
class NormFoldConfig:
    """fold_norms: the float precision the folding math runs in."""

    precision: str = "float64"

    def __post_init__(self):
        _one_of("NormFoldConfig", "precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class RotationConfig:
    """R1 / R2: which orthogonal matrix (`rotation`), its seed, an optional block-diagonal size."""

    rotation: str = "random-hadamard"
    seed: int = 0
    block_size: int | None = None
    precision: str = "float64"

    def __post_init__(self):
        _one_of("RotationConfig", "rotation", self.rotation, ROTATION_KINDS)
        _int_in("RotationConfig", "seed", self.seed, 0, 2 ** 63 - 1)
        if self.block_size is not None:
            _int_in("RotationConfig", "block_size", self.block_size, 1, 2 ** 20)
            if self.rotation == "random-orthogonal":
                raise RecipeError("RotationConfig.block_size applies to 'hadamard' and 'random-hadamard' only")
        _one_of("RotationConfig", "precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class WeightQuantConfig:
    """Round-to-nearest weights: `bits`, symmetric or not, per output channel or in input groups.

    `zero_point` (asymmetric only): "float", the tinygemm / FBGEMM int4 format (codes from the group
    min, x = (u - 2^(b-1)) * scale + zero with a float zero), or "int", an integer zero point
    (x = (u - z) * scale, with 0 exactly representable).
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None  # None: one scale per output channel
    clip_ratio: float = 1.0
    clip_search: bool = False  # per group, the clip ratio in 1.0..0.5 with the least squared error
    zero_point: str = "float"

    @property
    def float_zero(self) -> bool:
        return not self.symmetric and self.zero_point == "float"

    def __post_init__(self):
        _one_of("WeightQuantConfig", "bits", self.bits, (2, 3, 4, 8))
        _one_of("WeightQuantConfig", "symmetric", self.symmetric, (True, False))
        if self.group_size is not None:
            _int_in("WeightQuantConfig", "group_size", self.group_size, 1, 2 ** 20)
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) \
                or not 0 < self.clip_ratio <= 1:
            raise RecipeError(f"WeightQuantConfig.clip_ratio = {self.clip_ratio!r} must be in (0, 1]")
        _one_of("WeightQuantConfig", "clip_search", self.clip_search, (True, False))
        if self.clip_search and self.clip_ratio != 1.0:
            raise RecipeError("WeightQuantConfig: give clip_ratio or clip_search=true, not both")
        _one_of("WeightQuantConfig", "zero_point", self.zero_point, ZERO_POINTS)


@dataclass(frozen=True)
class ActQuantConfig:
    """Dynamic per-token activation fake-quant on every quantized linear's input."""

    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0  # < 1 clips each token's range before rounding

    def __post_init__(self):
        _one_of("ActQuantConfig", "bits", self.bits, (4, 8))
        _one_of("ActQuantConfig", "symmetric", self.symmetric, (True, False))
        _ratio("WeightQuantConfig", "clip_ratio", self.clip_ratio)


@dataclass(frozen=True)
class KVQuantConfig:
    """KV-cache fake-quant: keys (after R3) and values, one scale per (token, head)."""

    bits: int = 4
    symmetric: bool = False

    def __post_init__(self):
        _one_of("KVQuantConfig", "bits", self.bits, (4, 8))
        _one_of("KVQuantConfig", "symmetric", self.symmetric, (True, False))


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ: the target weight quantizer (as WeightQuantConfig: bits, symmetric, group_size,
    clip_ratio, clip_search, zero_point) and the solver's dampening (fraction of mean diag H), block
    size of lazy updates and act_order (channels by decreasing diag H)."""

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = 128
    clip_ratio: float = 1.0
    clip_search: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    zero_point: str = "float"

    float_zero = WeightQuantConfig.float_zero

    def __post_init__(self):
        try:
            WeightQuantConfig(self.bits, self.symmetric, self.group_size, self.clip_ratio, self.clip_search,
                              self.zero_point)
        except RecipeError as exc:
            raise RecipeError(str(exc).replace("WeightQuantConfig", "GPTQConfig")) from None
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise RecipeError(f"GPTQConfig.damp = {self.damp!r} must be in (0, 1)")
        _int_in("GPTQConfig", "block_size", self.block_size, 1, 2 ** 20)
        _one_of("GPTQConfig", "act_order", self.act_order, (True, False))


@dataclass(frozen=True)
class CLEConfig:
    """Cross-layer equalization: the float precision the folding math runs in."""

    precision: str = "float64"

    def __post_init__(self):
        _one_of("CLEConfig", "precision", self.precision, PRECISIONS)


SCOPES = ("norms", "foldable", "all")  # which scale groups an equalization pass edits (see SmoothQuantConfig)


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant: s = max|x|^alpha / max|W|^(1 - alpha) per input channel.

    `scope`: "norms" (only inputs made by a norm: q/k/v, gate/up), "foldable" (also v->o and
    up->down, where 1/s folds into a linear's rows) or "all" (also inputs no weight can absorb: an
    explicit multiply is inserted before the linears).
    """

    alpha: float = 0.5
    scope: str = "foldable"
    precision: str = "float64"

    def __post_init__(self):
        _ratio("SmoothQuantConfig", "alpha", self.alpha, lo_open=False)
        _one_of("SmoothQuantConfig", "scope", self.scope, SCOPES)
        _one_of("SmoothQuantConfig", "precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class AWQConfig:
    """AWQ: the weight quantizer it protects against (bits, symmetric, group_size, zero_point), the search grid
    over alpha in [0, 1), `duo_scaling` (s = x^a / w^(1-a); False: s = x^a; "both": try each), the
    scope (as SmoothQuantConfig), `search_tokens` (the calibration tokens each grid point's loss runs
    on: the first whole sequences holding that many; the statistics use all of them), and for awq_clip
    the largest shrink of each group's range."""

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = 128
    grid: int = 20
    duo_scaling: bool | str = True
    scope: str = "foldable"
    max_shrink: float = 0.5
    search_tokens: int = 4096
    precision: str = "float64"
    zero_point: str = "float"

    float_zero = WeightQuantConfig.float_zero

    def __post_init__(self):
        _one_of("AWQConfig", "bits", self.bits, (2, 3, 4, 8))
        _one_of("AWQConfig", "zero_point", self.zero_point, ZERO_POINTS)
        _one_of("AWQConfig", "symmetric", self.symmetric, (True, False))
        if self.group_size is not None:
            _int_in("AWQConfig", "group_size", self.group_size, 1, 2 ** 20)
        _int_in("AWQConfig", "grid", self.grid, 1, 1000)
        _one_of("AWQConfig", "duo_scaling", self.duo_scaling, (True, False, "both"))
        _one_of("AWQConfig", "scope", self.scope, SCOPES)
        _ratio("AWQConfig", "max_shrink", self.max_shrink, lo_open=False)
        _int_in("AWQConfig", "search_tokens", self.search_tokens, 1, 2 ** 40)
        _one_of("AWQConfig", "precision", self.precision, PRECISIONS)


CONFIG_TYPES = {cls.__name__: cls for cls in (NormFoldConfig, RotationConfig, WeightQuantConfig, ActQuantConfig,
                                              KVQuantConfig, SmoothQuantConfig, AWQConfig, CLEConfig, GPTQConfig)}


def config_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def config_from_dict(cls, fields: dict, where: str = ""):
    """Build `cls` from a dict, naming any unknown field and listing the allowed ones."""
    unknown = sorted(set(fields) - set(config_fields(cls)) - {"_type"})
    if unknown:
        raise RecipeError(f"{where or cls.__name__}: unknown field {unknown[0]!r}; "
                          f"allowed fields are {list(config_fields(cls))}")
    if fields.get("_type", cls.__name__) != cls.__name__:
        raise RecipeError(f"{where or cls.__name__}: _type {fields['_type']!r} is not {cls.__name__!r}")
    return cls(**{k: v for k, v in fields.items() if k != "_type"})


def config_to_dict(cfg) -> dict:
    """`{"_type": "RotationConfig", "rotation": ..., ...}`; None-valued fields are left out (TOML has no null)."""
    if type(cfg).__name__ not in CONFIG_TYPES:
        raise RecipeError(f"{type(cfg).__name__} is not a registered config type {sorted(CONFIG_TYPES)}")
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    return {"_type": type(cfg).__name__, **fields}
