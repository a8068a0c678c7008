"""Plans: which node runs which blocks, with an epoch.

Blocks are counted in execution order (for FLUX.2: double blocks, then single blocks)
and ranges are half-open `[start, end)`. The first entry is always the local node
(it embeds the inputs); the last entry also runs the final layer. A plan with several
remote entries describes a chain A -> B -> C.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError

PLAN_VERSION = 1
LOCAL = "local"


@dataclass(frozen=True, order=True)
class BlockRange:
    """Half-open range of block indices `[start, end)`."""

    start: int
    end: int

    def __post_init__(self):
        if not (isinstance(self.start, int) and isinstance(self.end, int)) or self.start < 0 or self.end < self.start:
            raise PlanError(f"invalid block range [{self.start}, {self.end}): need 0 <= start <= end")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, block: int) -> bool:
        return self.start <= block < self.end

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"

    def to_list(self) -> list[int]:
        return [self.start, self.end]

    @classmethod
    def from_list(cls, value) -> "BlockRange":
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise PlanError(f"a block range is [start, end], got {value!r}")
        return cls(int(value[0]), int(value[1]))


@dataclass(frozen=True)
class PlanEntry:
    node: str  # "local" for the process that embeds the inputs, else a peer's node id
    blocks: BlockRange


@dataclass(frozen=True)
class Plan:
    """An ordered cover of `[0, n_blocks)` by node ranges, tagged with an epoch."""

    n_blocks: int
    entries: tuple[PlanEntry, ...]
    epoch: int = 0

    def __post_init__(self):
        if not self.entries or self.entries[0].node != LOCAL:
            raise PlanError("a plan starts with the local entry (it embeds the inputs)")
        expected = 0
        for entry in self.entries:
            if entry.blocks.start != expected:
                raise PlanError(f"plan ranges must be contiguous: {entry.node} starts at {entry.blocks.start}, "
                                f"expected {expected}")
            expected = entry.blocks.end
        if expected != self.n_blocks:
            raise PlanError(f"plan covers [0, {expected}) but the model has {self.n_blocks} blocks")
        for entry in self.entries[1:]:
            if not len(entry.blocks):
                raise PlanError(f"remote entry {entry.node} hosts no blocks; drop it from the plan")

    @property
    def local(self) -> BlockRange:
        return self.entries[0].blocks

    @property
    def remotes(self) -> tuple[PlanEntry, ...]:
        return self.entries[1:]

    def range_of(self, node: str) -> BlockRange | None:
        for entry in self.entries:
            if entry.node == node:
                return entry.blocks
        return None

    def is_last(self, node: str) -> bool:
        return self.entries[-1].node == node

    @property
    def n_blocks_remote(self) -> int:
        return self.n_blocks - len(self.local)

    def to_dict(self) -> dict:
        return {"v": PLAN_VERSION, "n_blocks": self.n_blocks, "epoch": self.epoch,
                "entries": [[e.node, e.blocks.to_list()] for e in self.entries]}

    @classmethod
    def from_dict(cls, d) -> "Plan":
        try:
            if d.get("v") != PLAN_VERSION:
                raise PlanError(f"plan format version {d.get('v')!r}, this build reads {PLAN_VERSION}")
            entries = tuple(PlanEntry(str(node), BlockRange.from_list(r)) for node, r in d["entries"])
            return cls(int(d["n_blocks"]), entries, int(d["epoch"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed plan {d!r}: {exc}") from None


def tail_split(n_blocks: int, n_blocks_remote: int, remote: str = "remote", epoch: int = 0) -> Plan:
    """The default split: the remote runs the last `n_blocks_remote` blocks and the final layer."""
    if not 0 <= n_blocks_remote <= n_blocks:
        raise PlanError(f"n_blocks_remote must be in [0, {n_blocks}], got {n_blocks_remote}")
    cut = n_blocks - n_blocks_remote
    entries = [PlanEntry(LOCAL, BlockRange(0, cut))]
    if n_blocks_remote:
        entries.append(PlanEntry(remote, BlockRange(cut, n_blocks)))
    return Plan(n_blocks, tuple(entries), epoch)


def chain_split(n_blocks: int, counts: list[tuple[str, int]], epoch: int = 0) -> Plan:
    """Local front, then each `(node, n_blocks)` in order; the remainder stays local."""
    total = sum(n for _, n in counts)
    if total > n_blocks or any(n <= 0 for _, n in counts):
        raise PlanError(f"chain of {counts} does not fit {n_blocks} blocks (each node needs at least one)")
    start = n_blocks - total
    entries = [PlanEntry(LOCAL, BlockRange(0, start))]
    for node, n in counts:
        entries.append(PlanEntry(node, BlockRange(start, start + n)))
        start += n
    return Plan(n_blocks, tuple(entries), epoch)
