"""Write your own pass: fold each RMSNorm's weight into the linears that read it.

    x_hat * w  then  W  ==  x_hat  then  W diag(w)      (W: [out, in], w scales input columns)

The pass reads the Structure (which norm feeds which linears, found from data flow), edits the
model through the graph's links (`cg.param(ref)` is the live nn.Parameter), and returns what
changed. The Pipeline checks that the float outputs did not move and logs one line.

    python examples/write_your_own_pass.py --model tiny-llama
"""
from __future__ import annotations

import argparse

import torch

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


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    args = parser.parse_args(argv)
    model, _ = load_model(args.model)
    result = Pipeline([fold_rms_weights], verify_inputs=True).run(capture(model))
    print(result)  # e.g. "fold_rms_weights: 7 scaled, 5 folded, 0 blocked"
    return str(result)


if __name__ == "__main__":
    main()
