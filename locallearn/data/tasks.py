"""Synthetic tasks whose answers need composition across blocks: generated from a seed, no download.

Every task makes *examples* of exactly ``block_size + 1`` tokens (one window each, never cut), and for
every token says whether it is an *answer* (predictable only through the task's mechanism; the answer
metrics score these) and gives per-token *probe labels* of the intermediate features a solution needs
(``-1`` where a label does not apply). Token 0 is the separator ``|`` and token 1 the filler ``.``.

* :class:`AssociativeRecall` (multi-query associative recall, MQAR, Arora et al. 2023, "Zoology"):
  ``k v k v ... | q a q a ... . .``: ``n_pairs`` key-value pairs with distinct keys, then
  ``n_queries`` of those keys, each followed by its value (the answer); the pairs never queried are
  distractors. Keys and values have their own tokens.
* :class:`Induction` (Olsson et al. 2022): distinct random symbols in which one segment of
  ``segment`` symbols recurs later at a random offset; inside the second occurrence every token after
  the first is an answer: the previous token was seen once before, and the answer is what followed it.
* :class:`KHop` (pointer chasing): ``n_chains`` disjoint chains ``a0 -> a1 -> ... -> ak`` over node
  tokens, their edges as ``x y`` pairs in random order, then ``| a0 ak`` per chain (in random order):
  the answer ``ak`` is ``hops`` edges away from the queried node. ``hops=1`` is associative recall
  with keys and values drawn from one set of tokens.

Why depth is needed (causal attention, one head reads one position per layer): the answer is the token
*after* a match, so a block must first copy each position's previous token into it (a previous-token
head), and a later block can then attend to "the position whose previous token is my token" and read
it (the induction circuit, two attention layers). Each further hop needs one more lookup, so k-hop
needs about ``hops + 1`` blocks (fewer with pointer doubling, at best about ``log2(hops) + 2``).
"""

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from locallearn.data.base import TokenDataModule, own_generator
from locallearn.data.windows import RandomExamples
from locallearn.errors import ConfigError

SEP, FILL = 0, 1
IGNORE_LABEL = -1


@dataclass
class Examples:
    """``N`` examples of one task; every tensor has shape (N, T+1), one entry per token."""

    tokens: torch.Tensor  # int64 token ids
    answer: torch.Tensor  # bool: the token is an answer
    labels: dict[str, torch.Tensor]  # probe label name -> int64 class per token, IGNORE_LABEL where none

    def __len__(self) -> int:
        return len(self.tokens)


def _permutations(n: int, size: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(n, k): for each row, the first k of a uniform random permutation of range(size) (distinct values)."""
    return torch.rand(n, size, generator=g).argsort(dim=1)[:, :k]


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, m), (N, m) -> (N, 2m): a0 b0 a1 b1 ..."""
    return torch.stack((a, b), dim=2).flatten(1)


class Task:
    """A generator of examples. Subclasses set ``vocab`` and ``label_classes`` and implement ``generate``."""

    name = "task"
    vocab: list[str]
    label_classes: dict[str, list[str]]  # probe label -> class names

    def __init__(self, length: int):
        self.length = int(length)  # tokens per example: the data's block_size + 1

    def need(self, n_tokens: int, what: str):
        if n_tokens > self.length:
            raise ConfigError(f"data={self.name}: {what} takes {n_tokens} tokens, more than one window of "
                              f"data.block_size+1={self.length}; raise model.block_size or make the task smaller.")

    def generate(self, n: int, seed: int) -> Examples:
        raise NotImplementedError

    @property
    def chance(self) -> dict[str, float]:
        """Answer accuracy and loss (nats) of a guess uniform over the tokens an answer can be."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def _pad(self, seq: torch.Tensor) -> torch.Tensor:
        fill = torch.full((len(seq), self.length - seq.shape[1]), FILL, dtype=torch.long)
        return torch.cat((seq, fill), dim=1)


class AssociativeRecall(Task):
    """Multi-query associative recall. Probe labels:

    * ``pair_key`` (at the value of every context pair): its key, the previous token: what the first
      block of the induction circuit writes there;
    * ``recall`` (at every query key): the value to recall, read from the matching pair.
    """

    name = "mqar"

    def __init__(self, length: int, n_pairs: int = 6, n_queries: int = 3, n_keys: int = 32, n_values: int = 32):
        super().__init__(length)
        if not 1 <= n_pairs <= n_keys:
            raise ConfigError(f"data.n_pairs={n_pairs} must lie in [1, data.n_keys={n_keys}]: the keys of an "
                              f"example are distinct.")
        if not 1 <= n_queries <= n_pairs:
            raise ConfigError(f"data.n_queries={n_queries} must lie in [1, data.n_pairs={n_pairs}]: each query "
                              f"asks for one pair; the others are distractors.")
        self.n_pairs, self.n_queries, self.n_keys, self.n_values = n_pairs, n_queries, n_keys, n_values
        self.need(2 * n_pairs + 1 + 2 * n_queries, f"n_pairs={n_pairs} and n_queries={n_queries}")
        self.vocab = ["|", "."] + [f"k{i}" for i in range(n_keys)] + [f"v{i}" for i in range(n_values)]
        self.label_classes = {"pair_key": [f"k{i}" for i in range(n_keys)],
                              "recall": [f"v{i}" for i in range(n_values)]}

    def generate(self, n: int, seed: int) -> Examples:
        g = torch.Generator().manual_seed(seed)
        P, Q = self.n_pairs, self.n_queries
        keys = _permutations(n, self.n_keys, P, g)  # (n, P) distinct per example
        values = torch.randint(self.n_values, (n, P), generator=g)
        asked = _permutations(n, P, Q, g)  # (n, Q) which pairs the queries ask for
        q_keys, q_values = keys.gather(1, asked), values.gather(1, asked)
        k0, v0 = 2, 2 + self.n_keys  # first key and first value token
        sep = torch.full((n, 1), SEP, dtype=torch.long)
        tokens = self._pad(torch.cat((_interleave(keys + k0, values + v0), sep,
                                      _interleave(q_keys + k0, q_values + v0)), dim=1))
        answer = torch.zeros_like(tokens, dtype=torch.bool)
        first_answer = 2 * P + 2  # | at 2P, the first query key at 2P+1, its value next
        answer[:, first_answer:first_answer + 2 * Q:2] = True
        pair_key = torch.full_like(tokens, IGNORE_LABEL)
        pair_key[:, 1:2 * P:2] = keys
        recall = torch.full_like(tokens, IGNORE_LABEL)
        recall[:, first_answer - 1:first_answer - 1 + 2 * Q:2] = q_values
        return Examples(tokens, answer, {"pair_key": pair_key, "recall": recall})

    @property
    def chance(self) -> dict[str, float]:
        return {"answer_acc": 1 / self.n_values, "answer_loss": math.log(self.n_values)}


class Induction(Task):
    """Induction heads on distinct random symbols with one repeated segment. Probe labels:

    * ``prev_token`` (every token but the first): the previous token's symbol, what a previous-token
      head writes;
    * ``seen_before`` (every token): 1 if the same symbol occurred earlier in the example (only inside
      the repeat, as the other symbols are distinct): what matching the current token finds.
    """

    name = "induction"

    def __init__(self, length: int, n_symbols: int = 32, segment: int = 6):
        super().__init__(length)
        if segment < 2:
            raise ConfigError(f"data.segment={segment} must be at least 2: the first token of a repeat is not "
                              f"predictable, the ones after it are the answers.")
        self.need(2 * segment, f"two copies of data.segment={segment}")
        if n_symbols < self.length - segment:
            raise ConfigError(f"data.n_symbols={n_symbols} must be at least {self.length - segment} (the distinct "
                              f"symbols of one example of data.block_size+1={self.length} tokens with a repeat of "
                              f"{segment}); raise it.")
        self.n_symbols, self.segment = n_symbols, segment
        self.vocab = ["|", "."] + [f"s{i}" for i in range(n_symbols)]
        self.label_classes = {"prev_token": list(self.vocab), "seen_before": ["new", "seen"]}

    def generate(self, n: int, seed: int) -> Examples:
        g = torch.Generator().manual_seed(seed)
        T1, S = self.length, self.segment
        distinct = _permutations(n, self.n_symbols, T1 - S, g) + 2  # (n, T1-S) distinct symbols
        # The first copy starts at p1, the second at p2 >= p1 + S; p2 is uniform over what is left.
        p1 = (torch.rand(n, generator=g) * (T1 - 2 * S + 1)).long()
        p2 = p1 + S + (torch.rand(n, generator=g) * (T1 - S - (p1 + S) + 1)).long()
        pos = torch.arange(T1)
        p1, p2 = p1[:, None], p2[:, None]
        in_repeat = (pos >= p2) & (pos < p2 + S)  # (n, T1)
        # Which distinct symbol each position shows: in order before the repeat, the first copy's inside
        # it, and in order (shifted by the repeat) after it.
        src = torch.where(pos < p2, pos, torch.where(in_repeat, p1 + pos - p2, pos - S))
        tokens = distinct.gather(1, src)
        answer = in_repeat & (pos > p2)
        prev = torch.full_like(tokens, IGNORE_LABEL)
        prev[:, 1:] = tokens[:, :-1]
        return Examples(tokens, answer, {"prev_token": prev, "seen_before": in_repeat.long()})

    @property
    def chance(self) -> dict[str, float]:
        return {"answer_acc": 1 / self.n_symbols, "answer_loss": math.log(self.n_symbols)}


class KHop(Task):
    """k-hop pointer chasing. Probe labels ``hop1`` ... ``hop{k}`` (at every query's start node a0): the
    node reached after that many hops; ``hop{k}`` is the answer. A chunk whose states hold ``hop j`` but
    not ``hop j+1`` has done j of the hops."""

    name = "khop"

    def __init__(self, length: int, hops: int = 2, n_chains: int = 3, n_nodes: int = 32):
        super().__init__(length)
        if hops < 1:
            raise ConfigError(f"data.hops={hops} must be at least 1.")
        if n_chains < 1 or n_chains * (hops + 1) > n_nodes:
            raise ConfigError(f"data.n_chains={n_chains} chains of data.hops+1={hops + 1} distinct nodes need at "
                              f"least {max(n_chains, 1) * (hops + 1)} nodes but data.n_nodes={n_nodes}; raise "
                              f"n_nodes or lower n_chains.")
        self.hops, self.n_chains, self.n_nodes = hops, n_chains, n_nodes
        self.need(2 * n_chains * hops + 1 + 2 * n_chains, f"n_chains={n_chains} chains of hops={hops}")
        self.vocab = ["|", "."] + [f"n{i}" for i in range(n_nodes)]
        self.label_classes = {f"hop{j}": self.vocab[2:] for j in range(1, hops + 1)}

    def generate(self, n: int, seed: int) -> Examples:
        g = torch.Generator().manual_seed(seed)
        C, k = self.n_chains, self.hops
        chains = _permutations(n, self.n_nodes, C * (k + 1), g).view(n, C, k + 1)  # (n, C, k+1) distinct nodes
        edges = torch.stack((chains[:, :, :-1], chains[:, :, 1:]), dim=3).view(n, C * k, 2)
        order = torch.rand(n, C * k, generator=g).argsort(dim=1)
        edges = edges.gather(1, order[:, :, None].expand(-1, -1, 2))
        asked = torch.rand(n, C, generator=g).argsort(dim=1)  # the chains in query order
        chains = chains.gather(1, asked[:, :, None].expand(-1, -1, k + 1))
        sep = torch.full((n, 1), SEP, dtype=torch.long)
        tokens = self._pad(torch.cat((edges.flatten(1) + 2, sep, _interleave(chains[:, :, 0], chains[:, :, k]) + 2),
                                     dim=1))
        start = 2 * C * k + 1  # the first query's a0
        answer = torch.zeros_like(tokens, dtype=torch.bool)
        answer[:, start + 1:start + 2 * C:2] = True
        labels = {}
        for j in range(1, k + 1):
            hop = torch.full_like(tokens, IGNORE_LABEL)
            hop[:, start:start + 2 * C:2] = chains[:, :, j]
            labels[f"hop{j}"] = hop
        return Examples(tokens, answer, labels)

    @property
    def chance(self) -> dict[str, float]:
        return {"answer_acc": 1 / self.n_nodes, "answer_loss": math.log(self.n_nodes)}


class TaskDataModule(TokenDataModule):
    """A task's examples as a data module: one example per window, so ``block_size`` is the example length - 1.

    Training draws whole examples from a fixed pool of ``n_train`` (batch ``n`` a function of the run seed
    and ``n``, as for every corpus); validation scores ``val_windows`` other examples, and its batches are
    ``(tokens, answer)`` pairs so that the answer metrics know where the answers are. The pool and the
    validation examples depend on ``task_seed`` only, not on the run seed.
    """

    task_class: type[Task] = Task

    def __init__(self, batch_size: int, block_size: int, task_seed: int = 1234, n_train: int = 100_000, **kwargs):
        own = {k: kwargs.pop(k) for k in ("seed", "val_windows", "val_seed") if k in kwargs}
        super().__init__(batch_size, block_size, **own)
        if int(n_train) < 1:
            raise ConfigError(f"data.n_train={n_train} must be a positive number of training examples.")
        self.task = self.task_class(self.block_size + 1, **kwargs)
        self.name = self.task.name
        train = self.task.generate(int(n_train), seed=task_seed * 2 + 1)
        self.train_examples, self.val_examples = train.tokens, self.task.generate(self.val_windows, task_seed * 2 + 2)
        # Flat streams for what reads token statistics (the unigram entropy, the summary).
        self.train_tokens, self.val_tokens = self.train_examples.flatten(), self.val_examples.tokens.flatten()
        self.vocab = list(self.task.vocab)

    @property
    def chance(self) -> dict[str, float]:
        return self.task.chance

    def train_dataloader(self):
        start = self.trainer.global_step if self.trainer is not None else 0
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        rows = RandomExamples(self.train_examples, self.batch_size, self.seed, start, rank, world)
        return DataLoader(rows, batch_size=None, generator=own_generator())

    def val_dataloader(self):
        val = TensorDataset(self.val_examples.tokens, self.val_examples.answer)
        return DataLoader(val, batch_size=self.batch_size, shuffle=False, generator=own_generator())

    def describe(self) -> str:
        chance = self.chance
        return (f"{self.name}: {len(self.train_examples):,} training / {len(self.val_examples):,} validation "
                f"examples of {self.block_size + 1} tokens, vocab {self.vocab_size}, "
                f"{int(self.val_examples.answer.sum()) / len(self.val_examples):.1f} answers per example, "
                f"chance answer accuracy {chance['answer_acc']:.4f} (loss {chance['answer_loss']:.3f} nats)")


class MQARDataModule(TaskDataModule):
    """``data=mqar``: multi-query associative recall (:class:`AssociativeRecall`)."""

    task_class = AssociativeRecall


class InductionDataModule(TaskDataModule):
    """``data=induction``: a repeated segment among distinct symbols (:class:`Induction`)."""

    task_class = Induction


class KHopDataModule(TaskDataModule):
    """``data=khop``: k-hop pointer chasing (:class:`KHop`)."""

    task_class = KHop
