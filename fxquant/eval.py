"""Perplexity harness with one fixed calibration/eval split, so every figure in docs/ is comparable.

Entry points: `default_tokens(tokenizer)`, `eval_windows(tokens)`, `calibration_windows(tokens, n)`
and `perplexity(model, windows)`. The split, exactly:

1. Text: Python's own `pydoc_data.topics.topics` (a dict topic -> text, each ending in "\\n"), its
   values joined in dict order with "\\n", so topics are separated by one blank line. (Of the joins
   tried, "\\n" reproduces the reference below; "\\n\\n" gives 9.815, "" gives 9.966.) It ships with
   every Python, so no download; the text, and hence the figures, can change between Python versions.
2. Tokens: the whole text tokenized once, without special tokens (no BOS), into one 1-D stream
   (113,108 SmolLM2 tokens on Python 3.11).
3. Eval windows: the LAST `n_eval` (24) non-overlapping windows of `seq_len` (512) tokens, counted
   back from the end of the stream: row i is tokens[N - (n_eval - i) * seq_len : N - (n_eval - 1 - i) * seq_len].
4. Calibration windows: non-overlapping windows from the START of the stream (row i is
   tokens[i * seq_len : (i + 1) * seq_len]); asking for more than fit before the eval region raises.

Perplexity is exp(mean next-token NLL) over all predicted tokens of all windows (seq_len - 1 per
window), each window scored alone. Reference: SmolLM2-135M-Instruct, float32 -> 9.807.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxquant.errors import RecipeError
from fxquant.verify import main_tensor


@dataclass(frozen=True)
class EvalSplit:
    """The eval region: the last `n_eval` windows of `seq_len` tokens of the stream."""

    seq_len: int = 512
    n_eval: int = 24

    def __post_init__(self):
        if self.seq_len < 2 or self.n_eval < 1:
            raise RecipeError(
                f"EvalSplit(seq_len={self.seq_len}, n_eval={self.n_eval}) is out of range: a window "
                "needs seq_len >= 2 tokens (one to predict from, one to predict) and n_eval >= 1."
            )

    @property
    def eval_tokens(self) -> int:
        """How many tokens at the end of the stream the eval region covers."""
        return self.seq_len * self.n_eval


def default_text() -> str:
    """The default corpus: pydoc's topic texts in dict order, joined with "\\n" (see module doc)."""
    from pydoc_data.topics import topics

    return "\n".join(topics.values())


def default_tokens(tokenizer) -> torch.Tensor:
    """The default corpus as one 1-D LongTensor of token ids (no special tokens)."""
    ids = tokenizer(default_text(), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, split: EvalSplit = EvalSplit()) -> torch.Tensor:
    """The last `split.n_eval` non-overlapping windows of `tokens`, as a [n_eval, seq_len] LongTensor.

    Example::

        eval_windows(torch.arange(10), EvalSplit(seq_len=3, n_eval=2))
        # tensor([[4, 5, 6], [7, 8, 9]])
    """
    tokens = _stream(tokens)
    if len(tokens) < split.eval_tokens:
        raise RecipeError(
            f"the token stream has {len(tokens)} tokens, fewer than the {split.eval_tokens} the eval "
            f"region needs ({split.n_eval} windows of {split.seq_len}); use a longer text or a smaller EvalSplit."
        )
    return tokens[len(tokens) - split.eval_tokens :].reshape(split.n_eval, split.seq_len).clone()


def calibration_windows(
    tokens: torch.Tensor, n: int, seq_len: int = 512, split: EvalSplit = EvalSplit()
) -> torch.Tensor:
    """The first `n` non-overlapping windows of `seq_len` tokens, as a [n, seq_len] LongTensor.

    They never touch the eval region of `split`, so calibration never sees evaluation text.

    Example::

        calibration_windows(torch.arange(10), 2, seq_len=2, split=EvalSplit(seq_len=3, n_eval=2))
        # tensor([[0, 1], [2, 3]])
    """
    tokens = _stream(tokens)
    free = len(tokens) - split.eval_tokens
    fit = max(free, 0) // seq_len if seq_len > 0 else 0
    if seq_len < 1 or n < 0 or n > fit:
        raise RecipeError(
            f"asked for {n} calibration windows of {seq_len} tokens, but only {fit} fit before the eval "
            f"region (tokens {max(free, 0)}..{len(tokens)} of {len(tokens)}, {split}); "
            f"ask for at most {fit} windows, shorter windows, or a longer text."
        )
    return tokens[: n * seq_len].reshape(n, seq_len).clone()


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """exp(mean next-token NLL) of `model` over every predicted token of `windows` [n, seq_len].

    Each window is scored on its own (no KV cache carried over), in float64 accumulation.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.dtype != torch.long or batch_size < 1:
        raise RecipeError(
            f"perplexity needs a [n, seq_len >= 2] LongTensor of token ids and batch_size >= 1; got "
            f"{windows.dtype} {tuple(windows.shape)} with batch_size={batch_size}. Build windows with "
            "eval_windows() or calibration_windows()."
        )
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    with torch.inference_mode(), bar:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = main_tensor(model(batch, use_cache=False))
            # NLL of token t+1 given tokens 0..t, summed over the batch
            nll += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    return math.exp(nll / count)


def _stream(tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` as a 1-D LongTensor (a [1, N] batch from a tokenizer is flattened)."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise RecipeError(
            f"expected a 1-D token stream, got shape {tuple(tokens.shape)}; pass default_tokens(tokenizer)."
        )
    return tokens.long()
