"""A key that names one training sample by its tokens, the same wherever the sample is seen.

`axolotl qtuning select` writes it in its per-row report and ``log_decisions`` writes it in the
per-step record, so that the two join with each other and with the user's data (tokenise a row as
the run does, take its key) where a host keeps no row index.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

import torch

KEY_HEX_DIGITS = 16


def sample_key(input_ids: Sequence[int] | torch.Tensor) -> str:
    """The first 16 hex digits of SHA-256 over the sample's token ids as little-endian int64.

    Args:
        input_ids: the sample's token ids, prompt and response, without padding: ``[tokens]``.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.int64).reshape(-1).tolist()
    return hashlib.sha256(struct.pack(f"<{len(ids)}q", *ids)).hexdigest()[:KEY_HEX_DIGITS]
