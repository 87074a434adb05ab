r"""TidalDecode: a few token-selection layers, the rest reuse their choice (position persistence).

Paper: *TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention*
(Yang et al., arXiv 2410.05076). Official code: https://github.com/DerrickYLJ/TidalDecode
(``src/tidal_build/modify_llama.py``).

The paper observes that the tokens with the highest attention scores overlap strongly across
consecutive layers, so choosing them once serves many layers. At each decode step:

* layers $\ell < \ell_0$ (``sparse_layer_start``) read the whole cache;
* the token-selection layers $\ell_0$ and $\ell_c$ (``correction_layer``, the re-selection
  that corrects the drift of the chosen set) compute every score and keep, per query head,
  the $k$ best by the pre-softmax logits

$$
\mathcal I_h = \operatorname{TopK}_{j}\,\big(q_h \cdot k_{g(h),j}\big), \qquad
k \leftarrow \min(k, L);
$$

* every other layer $\ell > \ell_0$ reads the set chosen by the latest selection layer below
  it, with the softmax taken over those positions only (:func:`qkv.sparse_attention`).

The prefill is full attention. Defaults follow the official script: $k = 256$,
$\ell_0 = 2$, $\ell_c = 13$ (for 32-layer Llama; the function default in the code is 9). The
selection is per head here, as in the official PyTorch path (the kernel path shares one set;
its README lists per-head top-k as future work). Reused sets name cache slots, so every layer
must hold the same tokens (an uncompressed cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qkv.errors import ParameterError
from qkv.reference.kv.policy import CacheView, KVSelector, check_budget
from qkv.reference.ranking import top_k as top_k_indices
from qkv.reference.sparse.decode_scores import (
    all_slots,
    check_shared_tokens,
    check_top_k,
    head_scores,
)

Array = np.ndarray


def tidal_topk(scores: Array, top_k: int) -> Array:
    """Per-head top-``top_k`` slots by score, sorted (a token-selection layer).

    Args:
        scores: ``q . k`` per head ``(B, H, C)``, ``-inf`` on empty slots.
        top_k: keys each head keeps (at most the occupied slots of every head).

    Returns:
        Sorted slots ``(B, H, top_k)``.
    """
    occupied = int(np.isfinite(scores).sum(axis=-1).min()) if scores.size else 0
    top_k = check_top_k(top_k, occupied)
    best = top_k_indices(scores, top_k)  # (B, H, top_k)
    return np.sort(best, axis=-1)


@dataclass(frozen=True)
class TidalDecode(KVSelector):
    """TidalDecode as a decode-time selector.

    Attributes:
        top_k: keys each query head reads in the sparse layers.
        sparse_layer_start: first sparse layer, also the first token-selection layer
            (layers below read everything).
        correction_layer: the second token-selection layer (``None``: none).
    """

    top_k: int = 256
    sparse_layer_start: int = 2
    correction_layer: int | None = 13
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget("top_k", self.top_k)
        check_budget("sparse_layer_start", self.sparse_layer_start, minimum=0)
        if self.correction_layer is not None:
            check_budget("correction_layer", self.correction_layer, minimum=0)
            if self.correction_layer <= self.sparse_layer_start:
                raise ParameterError(
                    f"correction_layer: expected a layer after sparse_layer_start="
                    f"{self.sparse_layer_start}, got {self.correction_layer}"
                )

    def selects_at(self, layer: int) -> bool:
        """Whether ``layer`` is a token-selection layer."""
        return layer in (self.sparse_layer_start, self.correction_layer)

    def select(self, layer: int, cache: CacheView) -> Array:
        """Slots ``(B, H, S)`` each query head of ``layer`` reads."""
        H = cache.queries.shape[1]
        if layer < self.sparse_layer_start:
            return all_slots(cache, H)
        length = check_shared_tokens(cache, who="TidalDecode")
        if self.selects_at(layer):
            slots = tidal_topk(head_scores(cache), min(self.top_k, length))  # (B, H, k)
            self._state.update(slots=slots, indices=cache.indices.copy(), n=cache.n_tokens)
            return slots
        if self._state.get("n") != cache.n_tokens or not np.array_equal(
            self._state["indices"], cache.indices
        ):
            raise ParameterError(
                f"TidalDecode: layer {layer} reuses the selection of layer "
                f"{self.sparse_layer_start} of the same step, which was not made on this cache "
                "(run the layers in order on an uncompressed cache)"
            )
        return self._state["slots"]


#: The catalog id.
tidaldecode = TidalDecode
