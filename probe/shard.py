"""The one shard type of ``rotelab eval`` and ``rotelab capture`` (also importable as
``rotelab.probe.accuracy.Shard``): process ``i`` of ``n`` takes the checkpoints at series
positions ≡ i (mod n)."""

from __future__ import annotations

from dataclasses import dataclass

from rotelab.errors import RotelabError


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count`` evaluates the checkpoints whose series position % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise RotelabError(f"shard {self.index}/{self.count}: need 0 ≤ i < n")

    @classmethod
    def of(cls, shard: "Shard | tuple[int, int]") -> "Shard":
        """A :class:`Shard` from a shard or an ``(index, count)`` pair."""
        return shard if isinstance(shard, Shard) else cls(int(shard[0]), int(shard[1]))

    @classmethod
    def from_env(cls) -> "Shard | None":
        """``RANK``/``WORLD_SIZE`` when a launcher (torchrun, deepspeed) set them for several processes."""
        import os

        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            return None
        return cls(rank, world) if world > 1 else None

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        if not text:
            return cls()
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise RotelabError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
        if n < 1 or not 0 <= i < n:
            raise RotelabError(f"--shard {text!r}: need 0 <= i < n")
        return cls(i, n)
