"""Write your own pass: fold each RMSNorm's weight into the linears that read it.

    x_hat * w  then  W  ==  x_hat  then  W diag(w)      (W: [out, in], w scales input columns)

The pass reads the Structure (which norm feeds which linears, found from data flow), edits the
model through the graph's links (`cg.param(ref)` is the live nn.Parameter), and returns what
changed. The Pipeline checks that the float outputs did not move and logs one line.
`fxquant.register_pass` makes it a recipe step: `fxquant.quantize` and the compile backend
(`torch.compile(backend="fxquant", options={"recipe": ...})`) both run it.

    python examples/write_your_own_pass.py --model tiny-llama
"""
from __future__ import annotations

import argparse

import copy

import torch

import fxquant
from fxquant.capture import capture
from fxquant.models import load_model
from fxquant.pipeline import Change, PassResult, Pipeline, fxpass


@fxpass(provides={"rms_weights_folded"}, invalidates={"structure"})
def fold_rms_weights(cg, structure, cfg) -> PassResult:
    """Move every plain RMSNorm weight into its readers' input columns; the norm keeps weight 1."""
    structure.refuse_if_blocked("fold_rms_weights")
    changes, blocked = [], []
    tied = {name for group in structure.tied for name in group}
    with torch.no_grad():
        for group in structure.stream.groups:
            norm = group.norm
            if norm is None or norm.kind != "rms" or norm.offset or norm.weight is None:
                continue
            if any(r.weight.fqn in tied for r in group.readers):  # scaling lm_head would scale the embedding
                blocked.append(f"{norm.module}: a reader's weight is tied to another parameter")
                continue
            w = cg.param(norm.weight).double()
            for reader in group.readers:
                weight = cg.param(reader.weight)
                scale = w[:, None] if reader.transposed else w[None, :]  # Conv1D stores [in, out]
                weight.copy_((weight.double() * scale).to(weight.dtype))
                changes.append(Change("scaled", reader.module, f"input channels by {norm.module}.weight"))
            cg.param(norm.weight).fill_(1.0)
            changes.append(Change("folded", norm.module))
    return PassResult(tuple(changes), tuple(blocked))


RECIPE = {"name": "my-recipe", "passes": [{"pass": "fold_rms_weights"}, {"pass": "quantize_weights", "group_size": 32},
                                         {"pass": "pack"}]}


def in_a_recipe(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass as a recipe step, run by `fxquant.quantize` and by the compile backend: the same logits."""
    fxquant.register_pass("fold_rms_weights", fold_rms_weights)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    quantized = fxquant.lower(fxquant.quantize(copy.deepcopy(model), RECIPE), plan="rule")
    compiled = torch.compile(copy.deepcopy(model), backend="fxquant", options={"recipe": RECIPE, "plan": "rule"})
    with torch.no_grad():
        return quantized(ids, use_cache=False).logits, compiled(ids, use_cache=False).logits


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--recipe", action="store_true", help="also run it in a recipe, eager and compiled")
    args = parser.parse_args(argv)
    model, _ = load_model(args.model)
    result = Pipeline([fold_rms_weights], verify_inputs=True).run(capture(copy.deepcopy(model)))
    print(result)  # e.g. "fold_rms_weights: 7 scaled, 5 folded, 0 blocked"
    if args.recipe:
        eager, compiled = in_a_recipe(model)
        print(f"in a recipe: quantize + lower and the compile backend agree to {(eager - compiled).abs().max():.1e}")
    return str(result)


if __name__ == "__main__":
    main()
