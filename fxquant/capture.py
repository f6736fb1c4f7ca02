"""Capture: a model plus example inputs -> CapturedGraph (an aten-level fx graph linked to the model).

Entry point: `capture(model, example_inputs=None)`. It uses `torch.export.export(strict=False)`,
which traces every transformers-5 decoder we tried (`torch.fx.symbolic_trace` does not). Parameters
arrive as placeholders; each is linked to its owner module + attribute (`ParamRef`), and every call
node records the innermost module that ran it, so analysis can name modules and transforms can edit
the model itself.
"""
from __future__ import annotations

import sys
import time
import traceback

import torch

from fxquant.errors import CaptureError
from fxquant.ir import META_MODULE, META_PARAM, CapturedGraph, ParamRef
from fxquant.weights import shared_names

DEFAULT_SEQ_LEN = 16


def capture(model: torch.nn.Module, example_inputs=None, *, seq_len: int = DEFAULT_SEQ_LEN) -> CapturedGraph:
    """Trace `model` to an aten fx graph whose nodes link back to the model's modules and weights.

    `example_inputs` is a tuple of positional args or a dict of keyword args; for a transformers
    causal LM it may be omitted (random token ids of length `seq_len` are used, `use_cache=False`).

    Example::

        cg = fxquant.capture(AutoModelForCausalLM.from_config(cfg))
        cg.params["p_model_layers_0_self_attn_q_proj_weight"]
        # ParamRef(module='model.layers.0.self_attn.q_proj', name='weight')
    """
    args, kwargs = _example_inputs(model, example_inputs, seq_len)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as exc:  # torch.export raises many types; all become one CaptureError
        raise CaptureError(_explain_failure(model, exc)) from exc
    finally:
        model.train(was_training)
    gm = ep.graph_module
    params = _link_params(model, ep)
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in params:
            node.meta[META_PARAM] = params[node.name]
        elif node.op == "call_function":
            node.meta[META_MODULE] = _module_path(node)
    return CapturedGraph(
        model=model,
        gm=gm,
        params=params,
        tied=_tied_groups(model),
        example_inputs=(args, kwargs),
        capture_seconds=time.perf_counter() - start,
    )


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a transformers model with a vocabulary (the kind capture can feed token ids)."""
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "vocab_size", None) is not None


def _example_inputs(model, example_inputs, seq_len):
    if example_inputs is None:
        if not is_causal_lm(model):
            raise CaptureError(
                f"capture({type(model).__name__}) needs example_inputs: only transformers causal LMs "
                "get default token ids. Pass a tuple of positional tensors or a dict of keyword tensors."
            )
        vocab = int(model.config.vocab_size)
        ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
        return (ids,), {"use_cache": False}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = {"use_cache": False} if is_causal_lm(model) else {}
    return tuple(example_inputs), kwargs


def _link_params(model, ep) -> dict[str, ParamRef]:
    """Placeholder name -> ParamRef for every lifted parameter and buffer."""
    sig = ep.graph_signature
    fqns = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    links = {}
    for placeholder, fqn in fqns.items():
        module, _, name = fqn.rpartition(".")
        links[placeholder] = ParamRef(module, name)
    return links


def _tied_groups(model) -> tuple[tuple[str, ...], ...]:
    """Groups of parameter names that share one tensor (e.g. embed_tokens.weight and lm_head.weight)."""
    return tuple(tuple(sorted(names)) for names in shared_names(model).values() if len(names) > 1)


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path.removeprefix("L['self'].").removeprefix("L['self']")


def _explain_failure(model, exc) -> str:
    """Name the innermost module of `model` whose forward was running when export failed."""
    names = {id(m): n for n, m in model.named_modules()}
    where = None
    for frame, _ in traceback.walk_tb(sys.exc_info()[2] or exc.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            where = (names[id(owner)] or "<root>", type(owner).__name__)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    place = f" inside module '{where[0]}' ({where[1]})" if where else ""
    return (
        f"torch.export could not trace {type(model).__name__}{place}: {type(exc).__name__}: {first}. "
        "fxquant needs a model that torch.export.export(strict=False) can trace; check that the "
        "example inputs match forward(), and that the module has no data-dependent Python control flow."
    )
