"""The chunk plan: which transformer blocks each local loss trains.

All validation of chunk numbers lives here. Blocks are indexed from 0 in code; chunks are named
from 1 (``chunk1`` ... ``chunkK``) in configs, logs and summaries. The embedding belongs to chunk 1.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from locallearn.errors import ConfigError


@dataclass(frozen=True)
class Chunk:
    index: int  # position in the plan, from 0
    start: int  # first block of the chunk
    end: int  # one past its last block
    cut: int  # where its gradient is cut: `start`, or earlier when it overlaps earlier chunks
    embed: bool = False  # its loss also trains the embedding (an interlock that reaches chunk 1)

    @property
    def layers(self) -> range:
        """The blocks the chunk owns (and its optimizer param group holds)."""
        return range(self.start, self.end)

    @property
    def trained(self) -> range:
        """The blocks its local loss trains: its own and the overlapped ones of earlier chunks."""
        return range(self.cut, self.end)

    @property
    def name(self) -> str:
        return f"chunk{self.index + 1}"


@dataclass(frozen=True)
class ChunkPlan:
    n_layer: int
    chunks: tuple[Chunk, ...]

    @classmethod
    def build(cls, n_layer: int, chunks: int | None = None, boundaries: Sequence[int] | None = None,
              overlap: int = 0, interlock: int = 1) -> "ChunkPlan":
        """``chunks=K`` balanced split, or explicit ``boundaries`` (first block of every chunk but the first).

        ``overlap=o``: each chunk's local loss also trains the last o blocks before it (overlapping local
        parallelism, Laskin et al. 2020), which may reach past the previous chunk into earlier ones.
        ``interlock=n``: each chunk's loss trains its own blocks and those of the n-1 chunks before it, the
        embedding too when they include chunk 1 (n-wise interlocking backprop, Gomez et al. 2020); n=1 is
        local learning, n>=K trains the last loss end to end.
        """
        if boundaries is not None:
            cuts = cls._check_boundaries(n_layer, list(boundaries))
            if chunks is not None and chunks != len(cuts) + 1:
                raise ConfigError(
                    f"boundaries={cuts} makes {len(cuts) + 1} chunks but chunks={chunks}; "
                    f"pass chunks={len(cuts) + 1} (or chunks=null) with these boundaries."
                )
        else:
            if chunks is None:
                raise ConfigError("chunks=null needs boundaries=[...]; pass chunks=K or the boundaries.")
            cuts = cls._balanced(n_layer, chunks)
        edges = [0, *cuts, n_layer]
        spans = list(zip(edges[:-1], edges[1:]))
        cls._check_overlap(overlap, interlock, spans)
        if interlock > 1:  # whole chunks: the cut moves to the start of chunk k-n+1
            return cls(n_layer, tuple(Chunk(i, a, b, spans[max(i - interlock + 1, 0)][0], i > 0 and i < interlock)
                                      for i, (a, b) in enumerate(spans)))
        return cls(n_layer, tuple(Chunk(i, a, b, a - overlap if i else a) for i, (a, b) in enumerate(spans)))

    @staticmethod
    def _check_overlap(overlap, interlock, spans):
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ConfigError(f"overlap={overlap} must be a whole number of blocks, 0 or more.")
        if isinstance(interlock, bool) or not isinstance(interlock, int) or interlock < 1:
            raise ConfigError(f"interlock={interlock} must be a whole number of chunks, at least 1 (1 is local "
                              f"learning).")
        if overlap and interlock > 1:
            raise ConfigError(f"overlap={overlap} and interlock={interlock} both say how far a loss reaches back; "
                              f"pass one of them (overlap in blocks, interlock in whole chunks).")
        if overlap and len(spans) == 1:
            raise ConfigError(
                f"overlap={overlap} needs at least two chunks (there is no previous chunk to reach into); "
                f"pass chunks>=2 or overlap=0."
            )
        # The second chunk has the fewest blocks below it: every block of chunk 1 (the embedding is not a block).
        below = spans[1][0] if len(spans) > 1 else 0
        if overlap > below:
            raise ConfigError(
                f"overlap={overlap} reaches below block 0 from chunk2 (it starts at block {below}); an overlap "
                f"counts blocks before a chunk, so use overlap<={below} (or interlock=n for whole chunks).")

    @staticmethod
    def _balanced(n_layer: int, k) -> list[int]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"chunks={k} must be a whole number of at least 1 (chunks=1 is end-to-end backprop).")
        if k > n_layer:
            raise ConfigError(
                f"chunks={k} exceeds model.n_layer={n_layer}: every chunk needs at least one block, "
                f"so use chunks<={n_layer} or a deeper model."
            )
        size, extra = divmod(n_layer, k)
        sizes = [size + (i < extra) for i in range(k)]  # earlier chunks take the extra layer
        cuts, at = [], 0
        for s in sizes[:-1]:
            at += s
            cuts.append(at)
        return cuts

    @staticmethod
    def _check_boundaries(n_layer: int, cuts: list) -> list[int]:
        if any(isinstance(c, bool) or not isinstance(c, int) for c in cuts):
            raise ConfigError(f"boundaries={cuts} must be whole numbers (block indices).")
        if any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ConfigError(f"boundaries={cuts} must be strictly increasing, e.g. [1, 3].")
        if cuts and (cuts[0] < 1 or cuts[-1] > n_layer - 1):
            raise ConfigError(
                f"boundaries={cuts} must lie in 1..{n_layer - 1} for model.n_layer={n_layer} "
                f"(a boundary is the first block of a new chunk)."
            )
        return cuts

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        return iter(self.chunks)

    def __getitem__(self, k: int) -> Chunk:
        return self.chunks[k]

    @property
    def boundaries(self) -> list[int]:
        return [c.start for c in self.chunks[1:]]

    def describe(self) -> str:
        """One line per chunk, e.g. ``chunk1: embedding + blocks 0-1``."""
        lines = []
        for c in self.chunks:
            blocks = f"block {c.start}" if c.end - c.start == 1 else f"blocks {c.start}-{c.end - 1}"
            also = ("the embedding and " if c.embed else "") + f"block(s) {c.cut}-{c.start - 1}"
            extra = f" (its loss also trains {also})" if c.cut < c.start else ""
            lines.append(f"{c.name}: {'embedding + ' if c.index == 0 else ''}{blocks}{extra}")
        return "\n".join(lines)
