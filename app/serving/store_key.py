"""The embedding store's keys: which stored vectors may be compared with which.

A vector is only comparable with vectors of the same network computed the same way, and only
visible to the caller whose namespace stored it. So the store key is made of:

- the **model key**: the weights' sha256 for the float32 network (so stores written before
  this module stay readable), plus ``:int8:`` and the first 16 hex digits of the int8 graph's
  own sha256 for the int8 graph, whose vectors differ from float32's (cosine ~0.95-0.99, not
  equal) and from another quantisation's of the same weights;
- the caller's **namespace** (an API key's, see app/api/auth.py), if any.

The service and ``imgrec index`` both take their keys from here, so what one stores the other
finds.
"""

from __future__ import annotations

from app.model.card import ModelCard


def model_key(card: ModelCard, precision: str) -> str:
    """The key of the vectors this card's network computes at this precision."""
    if precision == "float32":
        return card.weights_sha256
    graph = card.graphs.get("int8") if precision == "int8" else None
    if graph is None:
        raise ValueError(f"no {precision} graph in the card of {card.name}")
    return f"{card.weights_sha256}:int8:{graph.sha256[:16]}"


def store_key(model_key: str, namespace: str | None) -> str:
    """The store key of a model's vectors for one caller: vectors of another model, or of
    another API key's namespace, are never found under it."""
    return model_key if namespace is None else f"{model_key}:{namespace}"
