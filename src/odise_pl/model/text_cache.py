"""Text embeddings of the vocabularies a model has seen, least recently used first out, by bytes.

Why ours: a server sees a new vocabulary with every request, and a cache of all of them grows
without end (a 20k-category vocabulary padded to its longest synonym list is ~735 MiB). What is
cached are tuples of tensors whose size is their ``nbytes``; the dozen lines below say exactly
that, where a general cache library would need a size function and a dependency.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from torch import Tensor


class TensorLRU:
    """``key -> tuple of tensors``, at most ``max_bytes`` in all (``None``: unbounded). An entry
    larger than the whole budget is not kept (the caller still has it).
    """

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Tensor, ...]] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def size(value: tuple[Tensor, ...]) -> int:
        return sum(t.numel() * t.element_size() for t in value)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> tuple[Tensor, ...] | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: tuple[Tensor, ...]) -> None:
        if key in self._items:
            self.nbytes -= self.size(self._items.pop(key))
        size = self.size(value)
        if self.max_bytes is not None and size > self.max_bytes:
            return
        self._items[key] = value
        self.nbytes += size
        while self.max_bytes is not None and self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= self.size(old)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
