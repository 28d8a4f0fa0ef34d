"""The digest of a checkpoint's weights: damage to a file is refused, never loaded.

``torch.load`` does not notice bytes changed inside a tensor's data (nor does
safetensors, which carries no checksum), so a convify checkpoint stores a
SHA-256 of its state_dict in the recipe, as literals::

    "digest": {"algorithm": "sha256", "value": "3f1c...e0"}

It hashes every entry in sorted key order: the key, the dtype, the shape and
the raw bytes of the tensor, so a tensor whose data, dtype or shape changed
does not match. :func:`check_digest` is called by ``load_checkpoint``, the one
reader of convify checkpoints.

The digest catches accidents (a bad disk, an interrupted copy), not
tampering: anyone who edits a file can write a new SHA-256 too.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch

from convify.errors import CheckpointError

ALGORITHM = "sha256"
#: Recipe versions written before the digest existed; every later one carries it.
WITHOUT_DIGEST = ("0.1.0",)


def weights_digest(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """The ``"digest"`` entry of a recipe for ``state_dict``.

    >>> weights_digest({"w": torch.zeros(2)})["algorithm"]
    'sha256'
    """
    h = hashlib.new(ALGORITHM)
    for key in sorted(state_dict):
        _hash_entry(h, key, state_dict[key])
    return {"algorithm": ALGORITHM, "value": h.hexdigest()}


def _hash_entry(h: Any, key: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):  # e.g. an `_extra_state` literal
        raw = repr(value).encode()
        h.update(json.dumps([key, type(value).__name__, len(raw)]).encode() + b"\n" + raw)
        return
    # Bytes as uint8 work for every dtype (bfloat16 too, which numpy lacks) and for 0-element tensors.
    raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    h.update(json.dumps([key, str(value.dtype), list(value.shape), raw.nbytes]).encode() + b"\n")
    h.update(raw)


def check_digest(checkpoint: Mapping[str, Any], source: str) -> None:
    """Refuse a checkpoint whose weights do not match the digest in its recipe.

    A recipe of a version written before the digest (0.1.0) is not checked.
    One of a later version without a digest is refused: convify always writes
    it, so a missing or unreadable digest is damage too.
    """
    recorded = checkpoint.get("digest")
    if recorded is None:
        if checkpoint.get("version") in WITHOUT_DIGEST:
            return
        raise CheckpointError(f"{source}: its recipe has no digest of its weights, which every convify checkpoint "
                              f"of version {checkpoint.get('version')!r} carries (the file is corrupt or was "
                              "edited): write it again from the model")
    if not (isinstance(recorded, Mapping) and recorded.get("algorithm") == ALGORITHM
            and isinstance(recorded.get("value"), str)):
        raise CheckpointError(f"{source}: the digest in its recipe is unreadable ({recorded!r:.80}; expected "
                              f"{{'algorithm': '{ALGORITHM}', 'value': ...}}): the file is corrupt")
    if weights_digest(checkpoint["state_dict"])["value"] != recorded["value"]:
        raise CheckpointError(f"{source}: the weights do not match the digest in its recipe (the file is corrupt: "
                              "copy or download it again, or write it again from the model)")
