"""The one eval path: a weighted mean loss over batches, and its perplexity.

Every validation loss in gptjax — the training loop's eval, `gptjax eval`, SFT's
masked validation loss, the perplexity of a checkpoint — is `weighted_mean_loss`
over a function returning a batch's summed loss and the weight it summed
(`{"loss_sum", "tokens"}`, as `family.eval_sums` and `Trainer.eval_step` do), so
every one is token-weighted the same way, whatever the batch sizes or masks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import jax

SumsFn = Callable[[dict], dict]  # batch -> {"loss_sum": scalar, "tokens": scalar}


def weighted_mean_loss(
    sums_fn: SumsFn, batches: Iterable[dict], max_batches: int | None = None
) -> dict[str, float]:
    """Σ loss_sum / Σ tokens over up to `max_batches` batches, with perplexity and the weight.

    Raises a ValueError when no batch (or no weighted token) was seen, rather than
    reporting a loss of 0.
    """
    total = weight = 0.0
    for batch in itertools.islice(batches, max_batches):
        out = jax.device_get(sums_fn(batch))
        total, weight = total + float(out["loss_sum"]), weight + float(out["tokens"])
    if not weight:
        raise ValueError(
            "no tokens to evaluate: the split is smaller than one batch (lower "
            "the eval batch size) or every loss weight is 0."
        )
    loss = total / weight
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": weight}
