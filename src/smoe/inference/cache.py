"""Key/value caches for :class:`smoe.model.SMoETransformer`: a static cache and a slot cache.

Legend: B batch rows of this call, N slots (rows of the storage), T new tokens per row,
S key columns attended, H key/value heads, d head size, L layers.

**The cache protocol** (what the model calls; ``model.py`` imports nothing from here):

* ``update(layer_idx, positions_BT, k_BHTd, v_BHTd) -> (keys_BHSd, values_BHSd, mask_BTS)``:
  store the new keys/values of each row at their positions and return what to attend to.
  ``mask_BTS`` is boolean (True = attend) or None when every query sees every returned key.
  The cache decides the mask: here, causal by position (key at position s is visible to a
  query at position p iff s <= p). A negative position marks padding: it is not stored, and
  its query attends to everything so that its (discarded) output stays finite.
* ``next_positions(batch_size, num_tokens, device) -> positions_BT``: where new tokens go when
  the caller gives no positions: each row continues after its own last stored position.

Keys are stored at their position (column s holds position s), so rows of different lengths
share one storage and one forward: "decode one token for slots [3, 7, 9] whose lengths are 17,
4 and 30" is ``model(next_B1, cache=slots.select([3, 7, 9]))``, one call, attending to S = 31
columns with each row masked to its own length.

Lengths are kept on the host: one small device-to-host read per forward (the largest position
of each row, on the first layer; none when positions come from :meth:`next_positions`) sizes
S; the layers after reuse it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["StaticCache", "SlotCache", "SlotBatch", "causal_position_mask"]


def causal_position_mask(positions_BT: torch.Tensor, num_keys: int) -> torch.Tensor:
    """mask_BTS: key column s visible to a query at position p iff s <= p; rows of padding
    queries (p < 0) see every column (their output is discarded, but must not be NaN)."""
    keys_S = torch.arange(num_keys, device=positions_BT.device)
    mask_BTS = keys_S <= positions_BT.unsqueeze(-1)
    return mask_BTS | (positions_BT < 0).unsqueeze(-1)


class _KVStore:
    """Per layer one (N, H, max_seq_len + 1, d) tensor for keys and one for values. The last
    column is scratch: padding tokens write there and it is never read."""

    def __init__(self, num_layers: int, num_rows: int, num_kv_heads: int, max_seq_len: int,
                 head_size: int, device: torch.device | str | None,
                 dtype: torch.dtype) -> None:
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("max_seq_len", max_seq_len), ("head_size", head_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        shape = (num_rows, num_kv_heads, max_seq_len + 1, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_seq_len = max_seq_len
        self.lengths = [0] * num_rows  # positions stored per row (host)
        # Per forward: the positions tensor seen first and what was derived from it.
        self._step: tuple[torch.Tensor, list[int], int, torch.Tensor | None] | None = None

    def _plan_step(self, rows: Sequence[int], positions_BT: torch.Tensor,
                   last_B: list[int] | None = None) -> tuple[int, torch.Tensor | None]:
        """(S, mask) for this forward, computed once (first layer) and reused by the others."""
        if self._step is not None and self._step[0] is positions_BT and self._step[1] == rows:
            return self._step[2], self._step[3]
        if positions_BT.dim() != 2 or positions_BT.shape[0] != len(rows):
            raise ValueError(f"positions_BT has shape {tuple(positions_BT.shape)}, expected "
                             f"({len(rows)}, T)")
        if last_B is None:
            last_B = positions_BT.amax(dim=1).tolist()  # the one host read of this forward
        end = max(max(last_B) + 1, 1)
        if end > self.max_seq_len:
            raise ValueError(f"position {end - 1} does not fit in the cache's max_seq_len="
                             f"{self.max_seq_len}: make a longer cache")
        for r, last in zip(rows, last_B):
            if last >= 0:  # a row's length is one past its last written position (a rewind
                self.lengths[r] = last + 1  # forgets what came after); all-padding: unchanged
        T = positions_BT.shape[1]
        # One query per row at the end of every row: it sees all S columns, no mask needed.
        no_mask = T == 1 and all(last == end - 1 for last in last_B)
        mask = None if no_mask else causal_position_mask(positions_BT, end)
        self._step = (positions_BT, list(rows), end, mask)
        return end, mask

    def _next_positions(self, rows: Sequence[int], num_tokens: int,
                        device: torch.device | str | None) -> torch.Tensor:
        starts = [self.lengths[r] for r in rows]
        positions_BT = (torch.tensor(starts, device=device).unsqueeze(1)
                        + torch.arange(num_tokens, device=device))
        self._plan_step(rows, positions_BT, [s + num_tokens - 1 for s in starts])
        return positions_BT

    def _update(self, layer_idx: int, rows: Sequence[int], where: slice | torch.Tensor,
                positions_BT: torch.Tensor, k_BHTd: torch.Tensor,
                v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        end, mask = self._plan_step(rows, positions_BT)
        cols_BT = positions_BT.masked_fill(positions_BT < 0, self.max_seq_len)  # pads: scratch
        k_store, v_store = self.k[layer_idx], self.v[layer_idx]
        if isinstance(where, slice):  # rows a..b: views, no copy
            k_rows, v_rows = k_store[where], v_store[where]
            col_BHTd = cols_BT[:, None, :, None].expand_as(k_BHTd)
            k_rows.scatter_(2, col_BHTd, k_BHTd)
            v_rows.scatter_(2, col_BHTd, v_BHTd)
            return k_rows[:, :, :end], v_rows[:, :, :end], mask
        rows_B = where
        # Advanced indices on dims 0 and 2 put (B, T) first: write (B, T, H, d).
        k_store[rows_B.unsqueeze(1), :, cols_BT] = k_BHTd.transpose(1, 2)
        v_store[rows_B.unsqueeze(1), :, cols_BT] = v_BHTd.transpose(1, 2)
        # Gathering other rows copies their keys (about what attention reads anyway).
        return k_store[rows_B, :, :end], v_store[rows_B, :, :end], mask


class StaticCache(_KVStore):
    """One row per batch row, the same batch every call (what ``generate`` uses).

    ``model(idx_BT, cache=cache)`` continues each row after its stored length; give
    ``positions_BT`` to write elsewhere (negative = padding). Keeps the attributes of the old
    ``smoe.model.KVCache`` (``k``, ``v``, ``batch_size``, ``max_seq_len``, ``for_model``).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_size: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        super().__init__(num_layers, batch_size, num_kv_heads, max_seq_len, head_size, device,
                         dtype)
        self.batch_size = batch_size
        self._rows = list(range(batch_size))
        self._all = slice(0, batch_size)

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int | None = None) -> StaticCache:
        """A cache on the model's device and in its dtype (length defaults to max_seq_len)."""
        c, w = model.config, model.embed.weight
        return cls(c.num_layers, batch_size, c.num_kv_heads, max_seq_len or c.max_seq_len,
                   c.head_size, device=w.device, dtype=w.dtype)

    def _check_batch(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"the cache was made for batch size {self.batch_size}, got "
                             f"{batch_size}")

    def next_positions(self, batch_size: int, num_tokens: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
        self._check_batch(batch_size)
        return self._next_positions(self._rows, num_tokens, device)

    def update(self, layer_idx: int, positions_BT: torch.Tensor, k_BHTd: torch.Tensor,
               v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self._check_batch(k_BHTd.shape[0])
        return self._update(layer_idx, self._rows, self._all, positions_BT, k_BHTd, v_BHTd)

    def reset(self) -> None:
        """Forget every row's contents (lengths to zero; storage is overwritten on reuse)."""
        self.lengths = [0] * self.batch_size
        self._step = None


class SlotCache(_KVStore):
    """``num_slots`` independent sequences with their own lengths: ``allocate()`` a slot for a
    request, ``free(slot)`` when it is done, and run any subset of slots in one forward
    through :meth:`select` (continuous batching)."""

    def __init__(self, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int,
                 head_size: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        super().__init__(num_layers, num_slots, num_kv_heads, max_seq_len, head_size, device,
                         dtype)
        self.num_slots = num_slots
        self._free = list(range(num_slots))

    @classmethod
    def for_model(cls, model, num_slots: int, max_seq_len: int | None = None) -> SlotCache:
        """A slot cache on the model's device and in its dtype."""
        c, w = model.config, model.embed.weight
        return cls(c.num_layers, num_slots, max_seq_len or c.max_seq_len, c.num_kv_heads,
                   c.head_size, device=w.device, dtype=w.dtype)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """The lowest free slot, now in use with length 0; ValueError when all are in use."""
        if not self._free:
            raise ValueError(f"all {self.num_slots} slots are in use: free one first")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give ``slot`` back (its contents are forgotten)."""
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot={slot} is not an allocated slot")
        self.lengths[slot] = 0
        self._free.append(slot)

    def length(self, slot: int) -> int:
        """Positions stored in ``slot``."""
        return self.lengths[slot]

    def select(self, slots: Sequence[int]) -> SlotBatch:
        """A cache over these slots, batch row i = ``slots[i]`` (pass it as ``cache=``)."""
        slots = [int(s) for s in slots]
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"slots={slots} must be a non-empty list of distinct slots")
        bad = [s for s in slots if not 0 <= s < self.num_slots or s in self._free]
        if bad:
            raise ValueError(f"slots {bad} are not allocated: allocate() them first")
        return SlotBatch(self, slots)


class SlotBatch:
    """The cache protocol over some slots of a :class:`SlotCache` (see :meth:`SlotCache.select`).
    Consecutive slots are written and read as views; others through an index (a copy)."""

    def __init__(self, cache: SlotCache, slots: list[int]) -> None:
        self.cache, self.slots = cache, slots
        self.batch_size = len(slots)
        self.max_seq_len = cache.max_seq_len
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            self._where: slice | torch.Tensor = slice(first, first + len(slots))
        else:
            self._where = torch.tensor(slots, device=cache.k[0].device)

    def _check_batch(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"{self.batch_size} slots were selected, got batch size "
                             f"{batch_size}")

    def next_positions(self, batch_size: int, num_tokens: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
        self._check_batch(batch_size)
        return self.cache._next_positions(self.slots, num_tokens, device)

    def update(self, layer_idx: int, positions_BT: torch.Tensor, k_BHTd: torch.Tensor,
               v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self._check_batch(k_BHTd.shape[0])
        return self.cache._update(layer_idx, self.slots, self._where, positions_BT,
                                  k_BHTd, v_BHTd)
