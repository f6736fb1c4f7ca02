"""SpinQuant's learned rotations: R1 and one R2 per layer trained with Cayley SGD, to be folded later.

    loss(R1, R2) = next-token cross-entropy of  Q_act,kv( model with W' = rotated(W; R1, R2) )

Entry point: the `learn_rotations` pass (recipe key `learn_rotations`, `LearnRotationsConfig`),
placed before `rotate_residual` / `rotate_vo` with `rotation = "learned"`, which fold what it learned
exactly as they fold a fixed matrix (one site list: `fxquant.rotations`). The one idea: the model
trained is the recipe's own. A copy of the model gets the recipe's later online rotations and
activation / KV quantizers (`fxquant::fake_quant`: straight through the rounding, exact through the
scale); its weights stay frozen and each step computes the rotated weights from R1, R2 (float when
GPTQ follows, as SpinQuant found; rounded to nearest, with the same gradient, otherwise), runs the
calibration rows through the model (each decoder block recomputed in the backward pass when
`checkpointing`), and moves R1, R2 by one Cayley step (`fxquant.cayley`), which keeps them
orthogonal (checked in float64 every step). The user's model is not touched until the folds run.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fxquant.analysis.dataflow import weight_sites
from fxquant.analysis.structure import RESIDUAL
from fxquant.calibrate import decoder_blocks, model_kwargs, require_calibration
from fxquant.calibration import split_rows
from fxquant.cayley import CayleySGD, orthogonality_error
from fxquant.config import GPTQConfig, LearnRotationsConfig, WeightQuantConfig
from fxquant.errors import PassError, RecipeError, UnsupportedPatternError
from fxquant.hadamard import check_rotation, rotation_matrix
from fxquant.pipeline import Change, PassResult, Pipeline, fxpass, recapture
from fxquant.quant.numerics import fake_quantize_ste
from fxquant.quant.rtn import round_weight
from fxquant.rotation_checkpoint import load_checkpoint, save_checkpoint
from fxquant.rotations import LEARNED, R1, r2_key, refuse_unfolded_norms, rotated_values, rotation_sites
from fxquant.weights import canonical, substituted

# the later steps, by the facts they declare: what the training copy runs, and what reads the result
TRAINED_AGAINST = frozenset({"online_r3", "online_r4", "activations_quantized", "kv_quantized"})
QUANTIZERS = frozenset({"activations_quantized", "kv_quantized"})
WEIGHTS, COMPENSATED, OUTPUT_LAYER = "weights_quantized", "weights_compensated", "lm_head_quantized"
FOLDS = {"residual_rotated": "r1", "values_rotated": "r2"}
ORTHOGONALITY_TOL = 1e-5  # max |R^T R - I| in float64, checked after every step


@dataclass(frozen=True)
class Target:
    """What the rotations are trained against: the later steps applied to the training copy, which
    matrices a later fold uses, and the weight step whose format the loss rounds to (None: float)."""

    steps: tuple
    r1: bool
    r2: bool
    weights: WeightQuantConfig | GPTQConfig | None
    note: str


def _ahead(cg) -> tuple:
    steps = cg.context.steps
    here = next((i for i, s in enumerate(steps) if s.fn is learn_rotations), None)
    return steps[here + 1:] if here is not None else ()


def _weight_config(step):
    """The later weight step's config (a WeightQuantConfig or GPTQConfig: round_weight takes either)."""
    return step.cfg or (GPTQConfig() if COMPENSATED in step.info.provides else WeightQuantConfig())


def _folds(ahead) -> set[str]:
    """'r1' / 'r2' for each later fold with rotation = 'learned' (the matrices to train)."""
    return {FOLDS[fact] for s in ahead for fact in s.info.provides & set(FOLDS)
            if getattr(s.cfg, "rotation", None) == "learned"}


def plan_target(ahead, cfg: LearnRotationsConfig) -> Target:
    """Read the recipe after learn_rotations (by the facts its steps declare): the folds it feeds
    and the quantizers it trains against."""
    folds = _folds(ahead)
    if not folds:
        raise RecipeError("learn_rotations trains the matrices a later rotate_residual / rotate_vo with rotation = "
                          "'learned' folds, and this recipe has none after it; add them, or drop learn_rotations")
    steps = tuple(s for s in ahead if s.info.provides & TRAINED_AGAINST)
    weight_steps = [s for s in ahead if WEIGHTS in s.info.provides and OUTPUT_LAYER not in s.info.provides]
    quantizers = any(s.info.provides & QUANTIZERS for s in steps)
    mode = cfg.weights
    if mode == "auto":
        compensated = bool(weight_steps) and COMPENSATED in weight_steps[0].info.provides
        mode = "float" if not weight_steps or (compensated and quantizers) else "rtn"
    if mode == "rtn" and not weight_steps:
        raise RecipeError("learn_rotations: weights = 'rtn' needs a weight-quantizing step (quantize_weights, gptq) "
                          "after it, the format to round to; use weights = 'float' or 'auto'")
    weights = _weight_config(weight_steps[0]) if mode == "rtn" else None
    if not quantizers and weights is None:
        raise RecipeError("learn_rotations: nothing after it quantizes activations, the KV cache or (with weights = "
                          "'rtn') weights, so every rotation gives the same loss; add quantizers after it")
    names = [s.name for s in steps] + ([f"{weights.format.describe()} weights (round to nearest)"] if weights
                                       else ["float weights"])
    return Target(steps, "r1" in folds, "r2" in folds, weights, "trained against " + ", ".join(names))


def _check(cg, structure, cfg: LearnRotationsConfig | None) -> None:
    cfg = cfg or LearnRotationsConfig()
    require_calibration(cg, structure, cfg)
    target = plan_target(_ahead(cg), cfg)
    if target.r1:
        check_rotation(cfg.init, structure.stream.width)
    for head_dim in sorted({c.head_dim for c in structure.vo_chains} if target.r2 else ()):
        check_rotation(cfg.init, head_dim)


def initial_matrices(structure, target: Target, cfg: LearnRotationsConfig) -> dict[str, torch.Tensor]:
    """The starting point: the fixed presets' matrices (R1 seed `seed`, layer i's R2 seed `seed + i`)."""
    start = {}
    if target.r1:
        start[R1] = rotation_matrix(cfg.init, structure.stream.width, seed=cfg.seed)
    if target.r2:
        for index, chain in enumerate(structure.vo_chains):
            start[r2_key(chain)] = rotation_matrix(cfg.init, chain.head_dim, seed=cfg.seed + index)
    return start


def _training_copy(cg, target: Target):
    """A copy of the model with the target's online rotations and quantizers, frozen, and its graph."""
    model = copy.deepcopy(cg.model)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = recapture(cg, model)
    if target.steps:
        Pipeline(target.steps, log=None, final_capture=False, calibration=cg.context.calibration).run(
            trained, facts={"weights_float", "norms_folded"})  # a quantizer may calibrate (searched clip ratios)
    return model, recapture(cg, model)


@contextmanager
def _checkpointed(model, blocks: list[str]):
    """Recompute each decoder block in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    modules = [model.get_submodule(b) for b in blocks]
    for m in modules:
        m.forward = lambda *a, _f=m.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def _rows(cg) -> list[dict]:
    """The calibration batches split into single rows (each step takes `batch_size` of them)."""
    return [row for batch in cg.context.calibration for row in split_rows(batch)]


def _predicted(row: dict) -> torch.Tensor | None:
    """Which next-token predictions of a [1, seq] row count: both tokens real (None: all of them)."""
    mask = row.get("attention_mask")
    return None if mask is None else mask[0, 1:].bool() & mask[0, :-1].bool()


def _next_token_logits(model, row: dict, extra: dict) -> torch.Tensor:
    """The model's next-token logits for a [1, seq] row, [seq - 1, vocab], at least float32."""
    out = model(**row, **extra)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    logits = logits[0, :-1]
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _token_loss(model, row: dict, extra: dict, teacher: torch.nn.Module | None = None) -> tuple[torch.Tensor, int]:
    """(sum over the row's real tokens of the next-token loss, their count): the NLL of the next
    token, or with a `teacher` (the float model) KL(teacher || model) of the next-token distributions."""
    logits = _next_token_logits(model, row, extra)
    if teacher is None:
        per_token = torch.nn.functional.cross_entropy(logits, row["input_ids"][0, 1:], reduction="none")
    else:
        with torch.no_grad():
            target = torch.log_softmax(_next_token_logits(teacher, row, extra), dim=-1)
        log_p = torch.log_softmax(logits, dim=-1)
        per_token = torch.nn.functional.kl_div(log_p, target, reduction="none", log_target=True).sum(-1)
    keep = _predicted(row)
    return (per_token.sum(), per_token.numel()) if keep is None else (per_token[keep].sum(), int(keep.sum()))


@dataclass
class _Trainer:
    """The training copy and what one step needs: base weights, rotated sites, quantized weights."""

    model: torch.nn.Module
    sites: tuple
    base: dict
    rounded: frozenset
    weights: WeightQuantConfig | GPTQConfig | None
    transposed: dict
    blocks: list
    extra: dict
    teacher: torch.nn.Module | None = None  # the float model, for the "kl" loss

    def step(self, matrices: dict[str, torch.Tensor], rows: list[dict], checkpointing: bool) -> tuple[float, dict]:
        """Mean loss per token over `rows` and d(loss)/d(matrix) for each matrix (in the model's dtype).

        Two stages: the rows' backward passes stop at the rotated weights (a leaf each), then one
        backward through the rotation products, so their cost is paid once per step, not per row."""
        dtype = next(iter(self.base.values())).dtype  # the model's own precision
        leaves = {k: m.detach().to(dtype, copy=True).requires_grad_() for k, m in matrices.items()}
        values = rotated_values(self.sites, self.base, leaves)  # the rotation's graph, built once per step
        values = {fqn: _rounded(v, self.transposed[fqn], self.weights) if fqn in self.rounded else v
                  for fqn, v in values.items()}
        used = {fqn: v.detach().requires_grad_() for fqn, v in values.items()}
        total, tokens = 0.0, 0
        counts = [_token_count(r) for r in rows]
        scale = 1.0 / max(1, sum(counts))
        with substituted(self.model, used), (_checkpointed(self.model, self.blocks) if checkpointing else nullcontext()):
            for row in rows:
                loss, n = _token_loss(self.model, row, self.extra, self.teacher)
                (loss * scale).backward()
                total, tokens = total + loss.item(), tokens + n
        keys = [k for k in values if used[k].grad is not None]
        torch.autograd.backward([values[k] for k in keys], [used[k].grad for k in keys])
        grads = {k: (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)) for k, leaf in leaves.items()}
        return total / max(1, tokens), grads


def _rounded(w: torch.Tensor, transposed: bool, cfg) -> torch.Tensor:
    """round_weight(w) exactly, differentiable as fake_quantize_ste: straight through the rounding,
    exact through each group's scale (so the rotation sees the weight outliers that coarsen a grid)."""
    c = canonical(w, transposed)
    surrogate = fake_quantize_ste(c, cfg.format, cfg.clip_ratio)
    return canonical(round_weight(c.detach(), cfg) + (surrogate - surrogate.detach()), transposed)


def _token_count(row: dict) -> int:
    keep = _predicted(row)
    return row["input_ids"].shape[1] - 1 if keep is None else int(keep.sum())


def _stored(site) -> tuple:
    """A site's rotations on its stored tensor's (rows, columns): equal for two names of one tensor
    that need the same edit (a tied embedding and lm_head both become E R1)."""
    return (site.inputs, site.outputs) if site.transposed else (site.outputs, site.inputs)


def _one_site_per_tensor(sites, params) -> tuple:
    """Drop the second name of a tied tensor (it is substituted under every name anyway)."""
    seen, kept = {}, []
    for s in sites:
        key = id(params[s.weight])
        if key in seen:
            if _stored(seen[key]) != _stored(s):
                raise UnsupportedPatternError(
                    f"learn_rotations: '{s.weight}' is tied to '{seen[key].weight}' but needs a different rotation "
                    "there; untie them (fold_norms does so when it scales a tied reader)")
            continue
        seen[key] = s
        kept.append(s)
    return tuple(kept)


def _trainer(cg, structure, target: Target, loss: str = "cross_entropy") -> _Trainer:
    """The training copy, its frozen base weights and the sites the rotations are computed into; for
    the "kl" loss the user's model (float, not yet rotated: rotations keep its function) is the teacher."""
    model, trained = _training_copy(cg, target)
    params = dict(model.named_parameters(remove_duplicate=False))
    sites = _one_site_per_tensor(rotation_sites(structure, target.r1, target.r2), params)
    names = {*(s.weight for s in sites), *(s.bias for s in sites if s.bias)}
    base = {n: params[n].detach() for n in names}
    quantized = {s.weight.fqn: s.transposed for s in weight_sites(trained)} if target.weights else {}
    rotated = {s.weight for s in sites}
    transposed = {s.weight: s.transposed for s in sites}
    if target.weights:  # quantized weights no rotation touches are rounded once, for good
        with torch.no_grad():
            for fqn in sorted(set(quantized) - rotated):
                w = params[fqn]
                w.copy_(canonical(round_weight(canonical(w, quantized[fqn]), target.weights), quantized[fqn]))
    blocks = decoder_blocks(model, [s.module for s in weight_sites(trained)])
    return _Trainer(model, sites, base, frozenset(set(quantized) & rotated), target.weights, transposed, blocks,
                    model_kwargs(model), cg.model if loss == "kl" else None)


def _check_orthogonal(opt: CayleySGD, step: int) -> None:
    for key, x in opt.matrices.items():
        err = orthogonality_error(x)
        if not err < ORTHOGONALITY_TOL:
            raise PassError(f"learn_rotations: {key} drifted from orthogonal at step {step} (max |R^T R - I| = "
                            f"{err:.3g} >= {ORTHOGONALITY_TOL}); lower lr")


@dataclass
class Progress:
    """Steps done before this run (a resumed checkpoint) and now, each step's loss, seconds spent."""

    done: int
    step: int
    losses: list
    seconds: float = 0.0


def _train(cg, cfg: LearnRotationsConfig, trainer: _Trainer, opt: CayleySGD, progress: Progress) -> None:
    """Run steps until `cfg.steps` (or the time budget), checkpointing every `save_every` steps."""
    rows, began, last = _rows(cg), time.perf_counter(), 0.0
    bar = tqdm(total=cfg.steps, initial=min(progress.done, cfg.steps), desc="learn_rotations", unit="step",
               disable=not cg.context.progress, leave=False)
    while progress.step < cfg.steps:
        if cfg.max_minutes is not None and time.perf_counter() - began + last > 60 * cfg.max_minutes:
            break  # the next step would overrun the budget
        t0, step = time.perf_counter(), progress.step
        batch = [rows[(step * cfg.batch_size + j) % len(rows)] for j in range(cfg.batch_size)]
        loss, grads = trainer.step(opt.matrices, batch, cfg.checkpointing)
        opt.step(grads, lr=cfg.lr * (1 - step / cfg.steps))  # linear decay to 0
        progress.step += 1
        _check_orthogonal(opt, progress.step)
        progress.losses.append(loss)
        last = time.perf_counter() - t0
        bar.update()
        bar.set_postfix(loss=f"{loss:.5g}")
        if cfg.checkpoint and progress.step % cfg.save_every == 0:
            save_checkpoint(cfg, opt, progress.step, progress.losses)
    bar.close()
    if cfg.checkpoint and progress.step > progress.done:
        save_checkpoint(cfg, opt, progress.step, progress.losses)
    progress.seconds = time.perf_counter() - began


@fxpass(requires={"norms_folded", "weights_float"}, provides={LEARNED}, check=_check)
def learn_rotations(cg, structure, cfg: LearnRotationsConfig | None) -> PassResult:
    """Train R1 / R2 against the recipe's later quantizers; a later fold with rotation = 'learned' uses them."""
    cfg = cfg or LearnRotationsConfig()
    target = plan_target(_ahead(cg), cfg)
    structure.refuse_if_blocked("learn_rotations (R1, R2)", [RESIDUAL] if target.r1 else [], strict=cfg.strict,
                                still="a learned R2 alone (rotate_residual with rotation = 'random-hadamard' and "
                                      "mode = 'auto', rotate_vo with rotation = 'learned')")
    if target.r1:
        refuse_unfolded_norms(cg, structure, "learn_rotations (R1)")
    start = initial_matrices(structure, target, cfg)
    opt = CayleySGD(start, lr=cfg.lr, momentum=cfg.momentum)
    done, losses = load_checkpoint(cfg, opt) if cfg.checkpoint else (0, [])
    progress = Progress(done, done, losses)
    if done < cfg.steps:  # a finished checkpoint needs no training copy
        _train(cg, cfg, _trainer(cg, structure, target, cfg.loss), opt, progress)
    cg.context.learned.update(opt.matrices)
    return PassResult(_changes(target, start, opt, progress))


def _changes(target: Target, start: dict, opt: CayleySGD, progress: Progress) -> tuple[Change, ...]:
    """One line for the training (steps, time, loss trend, what it trained against), one per matrix."""
    losses, done = progress.losses, progress.done
    trend = f"loss {losses[0]:.5g} (step 1) -> {losses[-1]:.5g} (step {len(losses)})" if losses else "no steps run"
    run = f"{progress.step - done} steps in {progress.seconds:.0f} s" + (f", resumed after step {done}" if done else "")
    lines = [Change("trained", "rotations", f"{run}; {trend}; {target.note}")]
    for key, x in opt.matrices.items():
        moved = (x - start[key]).abs().max().item()
        lines.append(Change("learned", key, f"{x.shape[0]}x{x.shape[1]}, max |R - R0| = {moved:.3g}"))
    return tuple(lines)
