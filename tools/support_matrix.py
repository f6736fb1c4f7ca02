"""Which transformers causal-LM architectures fxquant's float recipes handle: docs/ARCHITECTURES.md.

Usage: python tools/support_matrix.py [--types a,b,...] [--out docs/ARCHITECTURES.md] [--json FILE]

For every model type transformers maps to a causal LM, build a tiny random model (no download),
apply each float recipe (`RECIPES`) to a copy and compare its logits and greedy tokens with the
float model's. The one idea: a float recipe either keeps the model's function or refuses and leaves
the model as it was, so each (type, recipe) is one of `OUTCOMES`, and WRONG or crash is a bug in
fxquant (exit status 1). tests/test_support_matrix.py fails when the doc no longer matches the code.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import re
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURES.md"
RECIPES = ("quarot-float", "rotate-r1r2")
SMALL = dict(  # tiny sizes for whichever of these generic attributes a config has
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=128,
    n_embd=64, n_layer=2, n_head=4, n_positions=128, d_model=64, ffn_dim=128, n_inner=128, num_layers=2,
    num_heads=4, rotary_dim=16,  # GPT-2 / OPT / T5 / GPT-J spellings
    num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MLA_SMALL = dict(  # multi-head latent attention (a config with kv_lora_rank): RoPE over head_dim, no GQA
    num_key_value_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32, q_lora_rank=32,
)
SEQ_LEN, NEW_TOKENS = 12, 6
REL_TOL = 1e-3      # a recipe keeps the function: max |logit diff| <= REL_TOL * max |reference logit|
UNCHANGED_TOL = 1e-6  # a refusal leaves the model as it was (rollback restores every weight exactly)
TIMEOUT_S = 120     # per stage: building and running the float model, then each recipe
MAX_PARAMS = 30_000_000  # more after shrinking: the sizes live in a sub-config (text_config, ...): not built

HANDLED, PARTLY, REFUSED, WRONG, CRASH = "handled", "partly handled", "refused", "WRONG", "crash"
TIMEOUT, NOT_BUILDABLE = "timeout", "not buildable here"
OUTCOMES = (HANDLED, PARTLY, REFUSED, WRONG, CRASH, TIMEOUT, NOT_BUILDABLE)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one recipe did to one model type; `details`: what was left, why refused, what differs."""

    kind: str
    details: tuple[str, ...] = ()
    in_fxquant: bool = True  # False: the float model itself failed (not fxquant's fault)
    seconds: float = 0.0

    @property
    def is_bug(self) -> bool:
        return self.kind in (WRONG, CRASH) or (self.kind == TIMEOUT and self.in_fxquant)


@dataclasses.dataclass(frozen=True)
class Row:
    type: str
    model_class: str
    outcomes: dict  # recipe name -> Outcome
    seconds: float = 0.0  # the whole row: building, the float answers, every recipe and its checks


@dataclasses.dataclass(frozen=True)
class Reference:
    """The float model's answers on fixed token ids: logits, and greedy tokens (None: generate failed)."""

    ids: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor | None


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException, so no `except Exception` (fxquant's included) swallows it."""


# --- pure helpers: folding names, classifying results ------------------------------------------

_INDEX = re.compile(r"(?<=[A-Za-z_])(\.\d+)+(?=[.'\s,)\]]|$)")  # `.layers.1.` -> `.layers.N.`; not `0.5`
_NODE_SUFFIX = re.compile(r"'([A-Za-z_]+?)_\d+'")     # node 'add_11' -> 'add' (layer 0's is 'add')
_NODE = re.compile(r"node '[^']*' in module ")        # the node name is per layer; the module says where


def fold_layers(text: str) -> str:
    """One spelling for every layer: `node 'linear_5' in module 'model.layers.1.mlp'` -> `module 'model.layers.N.mlp'`."""
    text = _NODE.sub("module ", text)
    return _NODE_SUFFIX.sub(r"'\1'", _INDEX.sub(".N", text))


def distinct(items) -> tuple[str, ...]:
    """`items` with layer indices folded, duplicates dropped, first-seen order kept."""
    return tuple(dict.fromkeys(fold_layers(str(item)) for item in items))


def left_items(result) -> tuple[str, ...]:
    """What each pass of a PipelineResult left, one `pass: what: why` line per distinct item."""
    return distinct(f"{name}: {item}" for name, res in result.results.items() for item in res.blocked)


def classify_result(result, problems: list[str]) -> Outcome:
    """The outcome of a recipe that ran: WRONG when the outputs differ, else handled or partly handled."""
    if problems:
        return Outcome(WRONG, tuple(problems))
    left = left_items(result)
    return Outcome(PARTLY, left) if left else Outcome(HANDLED)


def classify_error(exc: BaseException, changed: str | None = None, max_places: int = 4) -> Outcome:
    """The outcome of a recipe that raised: refused (an FxquantError that left the model as it was), WRONG
    (a refusal that changed the model: `changed` says how), crash (any other exception, or a bug inside
    a pass that the pipeline wrapped in PassError: its cause is not an FxquantError)."""
    from fxquant.errors import FxquantError, PassError

    cause = exc.__cause__
    wrapped_bug = isinstance(exc, PassError) and cause is not None and not isinstance(cause, FxquantError)
    if not isinstance(exc, FxquantError) or wrapped_bug:
        bug = cause if wrapped_bug else exc  # the pipeline's line names the pass it happened in
        where = distinct(str(exc).splitlines()[:1]) if wrapped_bug else ()
        return Outcome(CRASH, (f"{type(bug).__name__}: {_first_line(bug)}", *where))
    lines = refusal_lines(str(exc), max_places)
    if changed is not None:
        return Outcome(WRONG, (f"refused, but the model changed: {changed}", *lines))
    return Outcome(REFUSED, lines)


def refusal_lines(message: str, max_places: int = 4) -> tuple[str, ...]:
    """An error message, compact: its first line and its distinct `- place` lines (else its first 3 lines)."""
    lines = distinct(line.strip() for line in message.splitlines() if line.strip())
    places = [line for line in lines[1:] if line.startswith("- ")]
    if not places:
        return lines[:3]
    more = (f"(and {len(places) - max_places} more)",) if len(places) > max_places else ()
    return (lines[0], *places[:max_places], *more)


def _first_line(exc: BaseException) -> str:
    """The message's first line, and the second too when the first only introduces it (ends in ':')."""
    lines = [line.strip() for line in str(exc).strip().splitlines()] or [type(exc).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


_POSITION = re.compile(r" \((after \[[^\]]*\]|as the first pass)\)")  # which passes ran before: in the details


def reason_key(line: str) -> str:
    """A refusal line without what varies by model: where it is, module paths and node names ('…'),
    model classes (X...), figures, the pass position and the advice after the first sentence."""
    line = re.sub(r"^(- )?(module '[^']*': )?", "", line.strip())
    line = _POSITION.sub("", line).split(". ")[0]
    line = re.sub(r"'[^'\s]*[.\d][^'\s]*'", "'…'", line)
    line = re.sub(r"\d+\.\d+(e[-+]?\d+)?", "…", line)
    return re.sub(r"\b\w+(ForCausalLM|Attention|Experts|Model|MLP|Block|Layer)\b", r"X\1", line)


# --- building and running models ----------------------------------------------------------------

def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def tiny_config(model_type: str):
    """`model_type`'s default config rebuilt with `SMALL` (and for MLA `MLA_SMALL`) sizes for the
    attributes it has and can set (some configs derive `head_dim` in a read-only property)."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type)
    small = {**SMALL, **MLA_SMALL} if hasattr(defaults, "kv_lora_rank") else SMALL
    return AutoConfig.for_model(model_type, **{k: v for k, v in small.items() if _settable(defaults, k)})


def _settable(config, name: str) -> bool:
    attr = getattr(type(config), name, None)  # a property without a setter: derived, not set
    return hasattr(config, name) and not (isinstance(attr, property) and attr.fset is None)


def build(model_type: str) -> torch.nn.Module:
    """A tiny random eval-mode model; 1-D parameters randomised as fxquant.models.tiny_model does.
    Counted on the meta device first, so a config whose sizes `SMALL` does not reach is refused, not built."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if count > MAX_PARAMS:
        raise ValueError(f"{count / 1e6:.0f}M parameters after shrinking (over {MAX_PARAMS / 1e6:.0f}M): "
                         "its sizes live in a sub-config (text_config, ...) the generic attributes do not reach")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)


def reference(model) -> Reference:
    """The float model's logits and greedy tokens; raises when the float model cannot run or is not finite."""
    vocab = min(getattr(model.config, "vocab_size", None) or SMALL["vocab_size"], SMALL["vocab_size"])
    ids = torch.randint(3, vocab, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    if not torch.isfinite(ref).all():
        raise ValueError("the float model's logits are not finite")
    try:
        tokens = greedy(model, ids)
    except Exception:  # a model whose generate() fails in float just has no greedy check
        tokens = None
    return Reference(ids, ref, tokens)


def relative_diff(model, ref: Reference) -> float:
    return ((logits(model, ref.ids) - ref.logits).abs().max() / ref.logits.abs().max().clamp_min(1e-12)).item()


def differences(model, ref: Reference) -> list[str]:
    """How the transformed model's answers differ from the float ones (empty: they match)."""
    problems = []
    diff = relative_diff(model, ref)
    if not diff <= REL_TOL:  # `not <=`: a NaN difference is a difference
        problems.append(f"logits differ: max |diff| / max |logit| = {diff:.3g} > {REL_TOL:g}")
    if ref.tokens is not None:
        try:
            tokens = greedy(model, ref.ids)
        except Exception as exc:
            return [*problems, f"generate() raised after the recipe: {type(exc).__name__}: {_first_line(exc)}"]
        if not torch.equal(tokens, ref.tokens):
            problems.append(f"greedy tokens differ: {ref.tokens[0, SEQ_LEN:].tolist()} -> {tokens[0, SEQ_LEN:].tolist()}")
    return problems


def _on_alarm(signum, frame):
    raise _Timeout()


@contextmanager
def deadline(seconds: int):
    """Raise _Timeout in the block after `seconds` (SIGALRM: in the main thread; no limit elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_recipe(model, recipe: str, ref: Reference, timeout: int = TIMEOUT_S) -> Outcome:
    """Apply `recipe` to `model` (a copy: it is edited) and judge the result against `ref`."""
    from fxquant.api import apply_recipe

    start = time.perf_counter()
    try:
        with deadline(timeout):
            try:
                result = apply_recipe(model, recipe)
            except Exception as exc:
                outcome = classify_error(exc, _changed(model, ref))
            else:
                outcome = classify_result(result, differences(model, ref))
    except _Timeout:
        outcome = Outcome(TIMEOUT, (f"the recipe (or running its result) took over {timeout} s",))
    return dataclasses.replace(outcome, seconds=round(time.perf_counter() - start, 2))


def _changed(model, ref: Reference) -> str | None:
    """How a model a recipe refused differs from its float self (None: it does not)."""
    try:
        diff = relative_diff(model, ref)
    except Exception as exc:
        return f"it no longer runs: {type(exc).__name__}: {_first_line(exc)}"
    return None if diff <= UNCHANGED_TOL else f"max |logit diff| / max |logit| = {diff:.3g}"


def survey_type(model_type: str, recipes=RECIPES, timeout: int = TIMEOUT_S) -> Row:
    """One row: build `model_type`, take its float answers, then run each recipe on a fresh copy."""
    start = time.perf_counter()
    try:
        with deadline(timeout):
            model = build(model_type)
            ref = reference(model)
    except _Timeout:
        failed = Outcome(TIMEOUT, (f"building and running the float model took over {timeout} s",), in_fxquant=False)
    except Exception as exc:  # sub-configs, downloads, tokenizers, float forward errors: not fxquant's
        failed = Outcome(NOT_BUILDABLE, (f"{type(exc).__name__}: {_first_line(exc)}",), in_fxquant=False)
    else:
        outcomes = {r: run_recipe(copy.deepcopy(model), r, ref, timeout) for r in recipes}
        return Row(model_type, type(model).__name__, outcomes, round(time.perf_counter() - start, 1))
    seconds = round(time.perf_counter() - start, 1)
    return Row(model_type, model_class(model_type), {r: failed for r in recipes}, seconds)


def survey(types, recipes=RECIPES, timeout: int = TIMEOUT_S, log=None) -> list[Row]:
    """Rows for `types`, in order; `log(row)` is called after each."""
    rows = []
    for t in types:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(survey_type(t, recipes, timeout))
        if log is not None:
            log(rows[-1])
    return rows


# --- the document -------------------------------------------------------------------------------

def _cell(text: str, limit: int = 160) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _summary(row: Row) -> str:
    """The short "what was left / why refused" cell: the first detail of each recipe (once if equal)."""
    firsts = {r: _short(o) for r, o in row.outcomes.items() if o.details and o.kind != HANDLED}
    if len(set(firsts.values())) <= 1:
        return _cell(next(iter(firsts.values()), ""))
    return "; ".join(_cell(f"{r}: {d}", 100) for r, d in firsts.items())


def _short(outcome: Outcome) -> str:
    """The detail that says most: for a refusal, its first reason rather than the header line."""
    return _POSITION.sub("", _reasons(outcome)[0].removeprefix("- ")) if outcome.kind == REFUSED else outcome.details[0]


def counts(rows, recipes=RECIPES) -> dict[str, Counter]:
    return {r: Counter(row.outcomes[r].kind for row in rows) for r in recipes}


def refusal_reasons(rows) -> Counter:
    """Distinct refusal reasons (names that vary by model folded) -> how many types each covers."""
    found = Counter()
    for row in rows:
        found.update({reason_key(line) for o in row.outcomes.values() if o.kind == REFUSED for line in _reasons(o)})
    return found


def _reasons(outcome: Outcome) -> tuple[str, ...]:
    """A refusal's reasons: its `- place` lines, else its first line (a capture error has no places)."""
    places = tuple(d for d in outcome.details if d.startswith("- "))
    return places or outcome.details[:1]


def render(rows, command: str, recipes=RECIPES) -> str:
    """docs/ARCHITECTURES.md: header, counts, one row per type, the refusal reasons, then per-type details."""
    import transformers

    table = counts(rows, recipes)
    out = [
        "# Architectures: which transformers causal LMs fxquant's float recipes handle",
        "",
        "Generated by `tools/support_matrix.py`; do not edit by hand. Each model type in transformers'",
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built as a tiny random model (default config, small sizes, random",
        "norm weights and biases; no download); each recipe runs on a fresh copy, and its logits (max |diff| <=",
        f"{REL_TOL:g} x max |logit|) and {NEW_TOKENS} greedy tokens are compared with the float model's.",
        "**handled**: ran, outputs match, no pass left anything; **partly handled**: ran, outputs match, some",
        "pass left something (listed); **refused**: fxquant raised its own error and left the model unchanged;",
        "**WRONG**: outputs differ, or a refusal changed the model; **crash**: another exception (or a bug inside a",
        f"pass); **timeout**: a stage took over {TIMEOUT_S} s; **not buildable here**: the tiny float model cannot",
        "be built or run this way (sub-configs, downloads, config errors): not fxquant's failure. Column s: the",
        "row's seconds (one CPU thread); the slow test `tests/test_support_matrix.py` reruns the cheapest rows",
        "within its time budget and fails when one no longer matches.",
        "",
        f"Regenerated by `{command}` on {datetime.date.today().isoformat()} (transformers "
        f"{transformers.__version__}, torch {torch.__version__}, {len(rows)} model types).",
        "",
        "| outcome | " + " | ".join(f"`{r}`" for r in recipes) + " |",
        "|---|" + "---|" * len(recipes),
        *(f"| {k} | " + " | ".join(str(table[r][k]) for r in recipes) + " |" for k in OUTCOMES),
        "",
        "| type | model class | " + " | ".join(f"`{r}`" for r in recipes) + " | s | what was left / why refused |",
        "|---|---|" + "---|" * len(recipes) + "---:|---|",
        *(f"| `{row.type}` | {row.model_class} | " + " | ".join(row.outcomes[r].kind for r in recipes)
          + f" | {row.seconds:.1f} | {_summary(row)} |" for row in rows),
        "",
        "## Refusal reasons, most common first",
        "",
        "| types | reason (names that vary by model shown as '…') |",
        "|---|---|",
        *(f"| {n} | {_cell(k, 300)} |" for k, n in refusal_reasons(rows).most_common()),
        "",
        "## Details",
        "",
    ]
    return "\n".join(out + _details(rows)) + "\n"


def _details(rows) -> list[str]:
    out = []
    for row in rows:
        if all(o.kind == HANDLED for o in row.outcomes.values()):
            continue
        out += [f"### `{row.type}`", ""]
        for recipe, o in row.outcomes.items():
            out.append(f"- `{recipe}`: {o.kind}" + ("" if o.details else "."))
            out += [f"  - {_cell(d.removeprefix('- '), 400)}" for d in o.details]
        out.append("")
    return out


_ROW = re.compile(r"^\| `([^`]+)` \| [^|]* \| ([^|]+?) \| ([^|]+?) \| ([\d.]+) \|")


def doc_rows(text: str) -> dict[str, tuple[tuple[str, str], float]]:
    """type -> (its recorded outcomes per recipe, its recorded seconds), read back from the doc's table."""
    return {m.group(1): ((m.group(2), m.group(3)), float(m.group(4))) for m in map(_ROW.match, text.splitlines()) if m}


def within_budget(recorded: dict[str, tuple[tuple, float]], budget_s: float) -> list[str]:
    """The types that fit in `budget_s` by their recorded seconds, cheapest first (ties by name):
    a deterministic subset of the doc for a time-limited test."""
    chosen, spent = [], 0.0
    for seconds, name in sorted((s, t) for t, (_, s) in recorded.items()):
        if spent + seconds > budget_s:
            break
        chosen.append(name)
        spent += seconds
    return sorted(chosen)


def to_json(rows) -> list[dict]:
    return [{"type": r.type, "model_class": r.model_class, "seconds": r.seconds,
             "outcomes": {k: dataclasses.asdict(o) for k, o in r.outcomes.items()}} for r in rows]


def _print_row(row: Row) -> None:
    cells = "  ".join(f"{r}={o.kind}" for r, o in row.outcomes.items())
    print(f"{row.type:28} {row.seconds:5.1f} s  {cells}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: all causal-LM types)")
    parser.add_argument("--out", default=str(DOC.relative_to(ROOT)), help="markdown file to write ('' for none)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per stage before a row times out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    known = model_types()
    types = args.types.split(",") if args.types else known
    unknown = [t for t in types if t not in known]
    if unknown:
        parser.error(f"unknown model type(s) {unknown}: choose from the {len(known)} in "
                     "transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (python tools/support_matrix.py --help)")
    start = time.perf_counter()
    rows = survey(types, timeout=args.timeout, log=_print_row)
    command = "python tools/support_matrix.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    if args.out:
        Path(args.out).write_text(render(rows, command.strip()))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(rows), indent=1))
    print(f"{len(rows)} types in {time.perf_counter() - start:.0f} s; " + "; ".join(
        f"{r}: " + ", ".join(f"{n} {k}" for k, n in c.most_common()) for r, c in counts(rows).items()))
    bugs = [(row.type, r, o) for row in rows for r, o in row.outcomes.items() if o.is_bug]
    for t, r, o in bugs:
        print(f"BUG {t} / {r}: {o.kind}: " + " | ".join(o.details), file=sys.stderr)
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
