"""GLM's attention mask, built in one place for every caller (a whole sequence, a prompt, a decode step)."""
from __future__ import annotations

import torch


def glm_mask(queries: torch.Tensor, keys: int, bidirectional: torch.Tensor,
             pad: torch.Tensor | None = None) -> torch.Tensor:
    """[b, 1, q, keys] bool, True = hidden (the reference's convention).

    queries: the cache slots of the queries, [q] for every row or [b, q] per row; a query sees the first
    `bidirectional` [b] slots after the `pad` [b] leading pad slots (none when pad is None) whatever its own
    slot, and the others causally (up to its own slot). Pad slots are seen by no query. Device work only,
    so a decode step that builds its mask can be captured in a CUDA graph."""
    key = torch.arange(keys, device=queries.device).view(1, 1, keys)
    query = queries.reshape(-1, queries.shape[-1], 1)
    first = bidirectional.view(-1, 1, 1)
    if pad is None:
        visible = (key < first) | (key <= query)
    else:
        pad = pad.view(-1, 1, 1)
        visible = ((key < pad + first) | (key <= query)) & (key >= pad)
    return ~visible.unsqueeze(1)
