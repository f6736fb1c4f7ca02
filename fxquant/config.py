"""Pass configurations: frozen dataclasses, validated when built, serialised through an allow-list.

Entry points: the `*Config` classes, `config_from_dict(cls, fields)` and `config_to_dict(cfg)`.
The one idea: a config is plain data checked at construction (a bad value fails before any model
is touched, with the allowed values in the message), and it round-trips to a dict / TOML table
keyed by `_type`, resolved through `CONFIG_TYPES`, never by pickle or import paths. The weight
quantizers' configs keep their format as flat fields (recipes and `--set bits=4` name them) and
check and expose it through one `QuantFormat` (`cfg.format`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fxquant.errors import RecipeError
from fxquant.quant.format import QuantFormat, check_format
from fxquant.quant.format import int_in as _int_in
from fxquant.quant.format import one_of as _one_of
from fxquant.quant.gptq import GPTQOptions

ROTATION_KINDS = ("hadamard", "random-hadamard", "random-orthogonal")  # = fxquant.hadamard.KINDS
ROTATION_SOURCES = (*ROTATION_KINDS, "learned")  # "learned": the matrix a learn_rotations step trained
TRAINED_WEIGHTS = ("auto", "float", "rtn")  # the weights learn_rotations trains against (LearnRotationsConfig)
ROTATION_LOSSES = ("cross_entropy", "kl")  # what learn_rotations minimises
PRECISIONS = ("float64", "float32")
R1_MODES = ("auto", "fold", "online")  # rotate_residual: fold Q into the stream, rotate reader inputs online, or pick


def _ratio(owner: str, field: str, value, lo_open: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (0 < value if lo_open else 0 <= value) \
        and value <= 1
    if not ok:
        raise RecipeError(f"{owner}.{field} = {value!r} must be in {'(0' if lo_open else '[0'}, 1]")


def _check_clip(cfg) -> None:
    """clip_ratio in (0, 1] or clip_search, not both (WeightQuantConfig, GPTQConfig)."""
    owner = type(cfg).__name__
    _ratio(owner, "clip_ratio", cfg.clip_ratio)
    _one_of(owner, "clip_search", cfg.clip_search, (True, False))
    if cfg.clip_search and cfg.clip_ratio != 1.0:
        raise RecipeError(f"{owner}: give clip_ratio or clip_search=true, not both")


class _FormatFields:
    """A config whose `bits`, `symmetric`, `group_size` and `zero_point` fields name a QuantFormat."""

    @property
    def format(self) -> QuantFormat:
        return QuantFormat(self.bits, self.symmetric, self.group_size, self.zero_point)

    def _check_format(self) -> None:
        check_format(self, type(self).__name__)


@dataclass(frozen=True)
class NormFoldConfig:
    """fold_norms (and R4's fold): the float precision the folding math runs in; `strict` refuses the
    whole model when analysis left any place unproven (default: only places the pass needs)."""

    precision: str = "float64"
    strict: bool = False

    def __post_init__(self):
        _one_of("NormFoldConfig", "precision", self.precision, PRECISIONS)
        _one_of("NormFoldConfig", "strict", self.strict, (True, False))


@dataclass(frozen=True)
class RotationConfig:
    """R1 / R2: which orthogonal matrix (`rotation`), its seed, an optional block-diagonal size.

    `rotation = "learned"` folds the matrices an earlier `learn_rotations` step trained (seed and
    block_size do not apply then). `strict` refuses the model when analysis left any place unproven.
    """

    rotation: str = "random-hadamard"
    seed: int = 0
    block_size: int | None = None
    precision: str = "float64"
    strict: bool = False

    def __post_init__(self):
        _one_of("RotationConfig", "strict", self.strict, (True, False))
        _one_of("RotationConfig", "rotation", self.rotation, ROTATION_SOURCES)
        _int_in("RotationConfig", "seed", self.seed, 0, 2 ** 63 - 1)
        if self.block_size is not None:
            _int_in("RotationConfig", "block_size", self.block_size, 1, 2 ** 20)
            if self.rotation in ("random-orthogonal", "learned"):
                raise RecipeError("RotationConfig.block_size applies to 'hadamard' and 'random-hadamard' only")
        _one_of("RotationConfig", "precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class ResidualRotationConfig(RotationConfig):
    """R1 (rotate_residual): a RotationConfig and where Q goes. `mode = "fold"` folds Q into every
    embedding, writer and reader; `"online"` rotates each reader's input by a Hadamard op at inference
    (its inverse folded into the reader: the stream itself is not rotated), for models whose stream no
    fold can rotate (a norm on a writer's output, as Gemma 2 / OLMo 2 have); `"auto"` folds where
    analysis proves it and goes online otherwise, and reports which.
    """

    mode: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        _one_of("ResidualRotationConfig", "mode", self.mode, R1_MODES)


@dataclass(frozen=True)
class LearnRotationsConfig:
    """learn_rotations (SpinQuant): train R1 and one R2 per layer with Cayley SGD against the recipe's
    later quantizers, starting from `init` with `seed` (the fixed presets' matrices).

    `steps` of `batch_size` calibration rows each, learning rate `lr` decaying linearly to 0,
    `momentum`; `weights` = "float" (GPTQ follows), "rtn" (round-to-nearest weights in the loss) or
    "auto" (float when GPTQ follows activation or KV quantizers, else rtn); `checkpointing`
    recomputes each decoder block in the backward pass (memory); `max_minutes` stops early;
    `checkpoint` is a file the rotations are saved to every `save_every` steps and resumed from.
    `loss` = "cross_entropy" (next-token NLL, SpinQuant's) or "kl" (KL divergence from the float
    model's next-token distribution, which is zero without quantization: every step's signal is the
    quantization error alone, at the cost of one float forward pass per row).
    """

    init: str = "random-hadamard"
    seed: int = 0
    steps: int = 100
    batch_size: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weights: str = "auto"
    checkpointing: bool = True
    max_minutes: float | None = None
    checkpoint: str | None = None
    save_every: int = 10
    strict: bool = False
    loss: str = "cross_entropy"

    def __post_init__(self):
        owner = "LearnRotationsConfig"
        _one_of(owner, "loss", self.loss, ROTATION_LOSSES)
        _one_of(owner, "strict", self.strict, (True, False))
        _one_of(owner, "init", self.init, ROTATION_KINDS)
        _int_in(owner, "seed", self.seed, 0, 2 ** 63 - 1)
        _int_in(owner, "steps", self.steps, 0, 2 ** 31)
        _int_in(owner, "batch_size", self.batch_size, 1, 2 ** 20)
        _int_in(owner, "save_every", self.save_every, 1, 2 ** 31)
        for name in ("lr", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < (1 if name == "momentum" else 1e3):
                raise RecipeError(f"{owner}.{name} = {value!r} must be a number in "
                                  f"{'[0, 1)' if name == 'momentum' else '[0, 1000)'}")
        _one_of(owner, "weights", self.weights, TRAINED_WEIGHTS)
        _one_of(owner, "checkpointing", self.checkpointing, (True, False))
        if self.max_minutes is not None and (isinstance(self.max_minutes, bool) or
                                             not isinstance(self.max_minutes, (int, float)) or self.max_minutes <= 0):
            raise RecipeError(f"{owner}.max_minutes = {self.max_minutes!r} must be a positive number of minutes")
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint):
            raise RecipeError(f"{owner}.checkpoint = {self.checkpoint!r} must be a file path")


@dataclass(frozen=True)
class WeightQuantConfig(_FormatFields):
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

    def __post_init__(self):
        self._check_format()
        _check_clip(self)


@dataclass(frozen=True)
class ActQuantConfig:
    """Dynamic per-token activation fake-quant on every quantized linear's input.

    Mixed precision: `rotated_input_bits` quantizes the inputs of the linears that carry an online
    Hadamard (R4) with that many bits instead of `bits` (None: `bits`); `output_layer_bits` also
    quantizes the output layer's input (None: it stays float, as without the field).
    `act_clip_search`: each layer's fixed clip ratio is searched on calibration data (the pass then
    needs it) instead of `clip_ratio` (its own name: a top-level `clip_search` override stays with
    the weights).
    """

    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0  # < 1 clips each token's range before rounding
    rotated_input_bits: int | None = None
    output_layer_bits: int | None = None
    act_clip_search: bool = False

    def __post_init__(self):
        _one_of("ActQuantConfig", "bits", self.bits, (4, 8))
        _one_of("ActQuantConfig", "symmetric", self.symmetric, (True, False))
        _ratio("ActQuantConfig", "clip_ratio", self.clip_ratio)
        _one_of("ActQuantConfig", "act_clip_search", self.act_clip_search, (True, False))
        if self.act_clip_search and self.clip_ratio != 1.0:
            raise RecipeError("ActQuantConfig: give clip_ratio or act_clip_search=true, not both")
        for field in ("rotated_input_bits", "output_layer_bits"):
            if getattr(self, field) is not None:
                _one_of("ActQuantConfig", field, getattr(self, field), (4, 8))


@dataclass(frozen=True)
class KVQuantConfig:
    """KV-cache fake-quant: keys (after R3) and values, one scale per (token, head), or per
    (token, head, group of `kv_group_size` channels); `kv_clip_ratio` < 1 clips each row's range;
    the first `sink_tokens` positions of the sequence (attention sinks) stay float. The `kv_`
    prefix keeps a recipe's top-level `clip_ratio` / `group_size` override off the KV cache."""

    bits: int = 4
    symmetric: bool = False
    kv_clip_ratio: float = 1.0
    kv_group_size: int | None = None  # None: the whole head
    sink_tokens: int = 0

    def __post_init__(self):
        _one_of("KVQuantConfig", "bits", self.bits, (4, 8))
        _one_of("KVQuantConfig", "symmetric", self.symmetric, (True, False))
        _ratio("KVQuantConfig", "kv_clip_ratio", self.kv_clip_ratio)
        if self.kv_group_size is not None:
            _int_in("KVQuantConfig", "kv_group_size", self.kv_group_size, 1, 2 ** 20)
        _int_in("KVQuantConfig", "sink_tokens", self.sink_tokens, 0, 2 ** 20)


@dataclass(frozen=True)
class GPTQConfig(_FormatFields):
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
    act_aware: bool = False  # GPTAQ-style: solve for the activation quantizers already on the model

    @property
    def options(self) -> GPTQOptions:
        """The solver's options (fxquant.quant.gptq)."""
        return GPTQOptions(self.damp, self.block_size, self.act_order, self.clip_ratio, self.clip_search)

    def __post_init__(self):
        self._check_format()
        _check_clip(self)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise RecipeError(f"GPTQConfig.damp = {self.damp!r} must be in (0, 1)")
        _int_in("GPTQConfig", "block_size", self.block_size, 1, 2 ** 20)
        _one_of("GPTQConfig", "act_order", self.act_order, (True, False))
        _one_of("GPTQConfig", "act_aware", self.act_aware, (True, False))


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
class AWQConfig(_FormatFields):
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

    def __post_init__(self):
        self._check_format()
        _int_in("AWQConfig", "grid", self.grid, 1, 1000)
        _one_of("AWQConfig", "duo_scaling", self.duo_scaling, (True, False, "both"))
        _one_of("AWQConfig", "scope", self.scope, SCOPES)
        _ratio("AWQConfig", "max_shrink", self.max_shrink, lo_open=False)
        _int_in("AWQConfig", "search_tokens", self.search_tokens, 1, 2 ** 40)
        _one_of("AWQConfig", "precision", self.precision, PRECISIONS)


CONFIG_TYPES = {cls.__name__: cls for cls in (NormFoldConfig, RotationConfig, ResidualRotationConfig, LearnRotationsConfig, WeightQuantConfig,
                                              ActQuantConfig, KVQuantConfig, SmoothQuantConfig, AWQConfig, CLEConfig,
                                              GPTQConfig)}


def register_config(cls) -> None:
    """Allow a user's frozen config class in recipes and saved directories (the `_type` allow-list)."""
    known = CONFIG_TYPES.get(cls.__name__)
    if known is not None and known is not cls:
        raise RecipeError(f"a config type named {cls.__name__!r} is already registered ({known.__module__}); rename yours")
    CONFIG_TYPES[cls.__name__] = cls


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
