"""Running an SAE's model over held-out text for analysis: the SAE-fits-the-model check, and the batches.

Every analysis (evaluate, feature stats, steering, the mechanism catalogue) checks the SAE against the model
with `sae.runs.check_sae_fits` (`open_sae` runs it too); evaluate and feature stats read their text
through `heldout_batches`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor
from tqdm.auto import tqdm

from activations.hookpoints import parse_hook
from activations.models import LoadedModel
from activations.sources import Document
from activations.store import ActivationStore, StoreConfig
from activations.tokens import ContextBatch
from sae.base import SAE


def heldout_batches(
    sae: SAE,
    lm: LoadedModel,
    source: Iterable[Document],
    tokens: int,
    model_batch_size: int,
    context_size: int | None = None,
    desc: str = "held-out",
) -> Iterator[tuple[ContextBatch, Tensor, Tensor]]:
    """(batch, tokens [B, T] on lm.device, keep mask [B, T]) for whole model batches of `source` in the SAE's
    contexts (its context size and BOS rule, one epoch, raw activations), until at least `tokens` kept tokens."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    ctx = context_size or sae.cfg.context_size or 128
    store_cfg = StoreConfig(
        hooks=[hp.name],
        context_size=ctx,
        model_batch_size=model_batch_size,
        prepend_bos=sae.cfg.prepend_bos,
        epochs=1,
        normalise=False,
    )
    store = ActivationStore(lm, source, store_cfg)
    seen = 0
    with tqdm(total=tokens, desc=desc, unit="tok", dynamic_ncols=True) as bar:
        for batch in store.context_batches():
            ids = batch.tokens.to(lm.device)
            keep = store.keep_mask(ids)
            yield batch, ids, keep
            n = int(keep.sum())
            seen += n
            bar.update(n)
            if seen >= tokens:
                return
