"""Probe tasks: labelled words in a token stream, split into probe-train / probe-dev / probe-test.

* UD treebanks (``upos``, ``deprel``; any treebank by path, EWT by default): sentences of the CoNLL-U files
  joined exactly as ``data=ewt`` joins them for training; each word keeps its character span, which the probe
  analysis maps onto the pieces of each run's tokenizer (locallearn/probing/features.py, ``word_pieces``: the
  word's last piece, or the mean of its pieces).
* synthetic, every token a word (see :class:`locallearn.data.synthetic.Corpus` for the definitions):
  ``agreement`` (the number, sg / pl, that the verb of the token's clause agrees with), ``role``
  (nouns only: subject, object or prepositional object) and ``depth`` (nesting depth) depend on the
  token's context: most token ids carry several labels. ``category`` (the word class) is a function of
  the token id, so a probe of it reads the embedding, not learned structure: it is kept as a
  *lexical control* only, and says so wherever it is reported.

* tasks (``data=induction|mqar|khop``, see :mod:`locallearn.data.tasks`): the per-token labels of the
  intermediate features a solution needs, on fresh examples of the run's task: ``prev_token`` and
  ``seen_before`` (induction), ``pair_key`` and ``recall`` (mqar), ``hop1`` ... ``hop{k}`` (khop). Every
  example is read as its own window, as in training.

A control task (Hewitt & Liang 2019) gives every word type a fixed random label drawn from the task's
label distribution: a probe that scores well on it memorizes word identity instead of reading syntax.
"""

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import ListConfig

from locallearn.data.conllu import UPOS, read_conllu
from locallearn.data.ewt import join_sentences
from locallearn.data.synthetic import CATEGORIES, NUMBERS, ROLES, Grammar
from locallearn.errors import ConfigError
from locallearn.names import treebank_name

UD_TASKS = ("upos", "deprel")
SYNTHETIC_TASKS = ("agreement", "role", "depth", "category")
LEXICAL_TASKS = ("category",)  # labels that are a function of the token id: controls, not structure
SPLITS = ("train", "dev", "test")


@dataclass
class Split:
    """One split: the text or token stream, the positions of its words, their labels and word types."""

    text: str | None  # character stream (a treebank's sentences), or None for token streams
    tokens: np.ndarray | None  # token ids (synthetic), or None for text
    positions: np.ndarray  # (N,) index in the stream of each word's last character / token
    labels: np.ndarray  # (N,) int label ids
    types: list[str]  # (N,) word type of each word, for the control task
    example_len: int | None = None  # tasks: the stream is examples of this many tokens, each its own window
    starts: np.ndarray | None = None  # text: (N,) index of each word's first character


@dataclass
class ProbeTask:
    name: str
    source: str  # "ud", "synthetic" or the task's name (e.g. "induction"): which streams the task reads
    classes: list[str]
    splits: dict[str, Split]
    treebank: str | None = None  # ud: the treebank's name ("en_ewt")
    note: str = ""  # how the splits were made, where they are not the files' own

    @property
    def lexical(self) -> bool:
        """Whether the label is a function of the word type by definition (a lexical control)."""
        return self.name in LEXICAL_TASKS

    def ambiguous_types(self, split: str = "train") -> tuple[int, int]:
        """Word types of ``split`` that carry more than one label, and all its word types."""
        data = self.splits[split]
        seen: dict[str, set] = {}
        for t, y in zip(data.types, data.labels.tolist()):
            seen.setdefault(t, set()).add(y)
        return sum(len(v) > 1 for v in seen.values()), len(seen)

    def control_labels(self, seed: int) -> dict[str, np.ndarray]:
        """Per split, the control label of each word: one draw per word type from the train labels' distribution."""
        counts = np.bincount(self.splits["train"].labels, minlength=len(self.classes)).astype(float)
        rng = np.random.default_rng(seed)
        types = sorted({t for s in self.splits.values() for t in s.types})
        drawn = rng.choice(len(self.classes), size=len(types), p=counts / counts.sum())
        table = dict(zip(types, drawn))
        return {name: np.array([table[t] for t in s.types], dtype=np.int64) for name, s in self.splits.items()}


def treebank_files(path) -> dict[str, Path]:
    """{split: file} of a treebank: a folder of UD's ``*-ud-{train,dev,test}.conllu`` (any ``.conllu`` whose name
    holds the split), or a list of such files. dev and test are needed; train is optional."""
    paths = [Path(p).expanduser() for p in (path if isinstance(path, (list, tuple, ListConfig)) else [path])]
    if len(paths) == 1 and paths[0].is_dir():
        candidates = sorted(paths[0].glob("*.conllu"))
    else:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"treebank={missing[0]} does not exist; pass a folder of .conllu files or the "
                              f"files themselves, e.g. treebank=[a-ud-dev.conllu,a-ud-test.conllu].")
        candidates = paths
    files = {}
    for split in SPLITS:
        found = [p for p in candidates if re.search(rf"(^|[-_.]){split}([-_.]|$)", p.stem)]
        if len(found) > 1:
            raise ConfigError(f"treebank={path} holds several {split} files ({', '.join(p.name for p in found)}); "
                              f"pass the three files as treebank=[train,dev,test].")
        if found:
            files[split] = found[0]
    lacking = [s for s in ("dev", "test") if s not in files]
    if lacking:
        raise ConfigError(f"treebank={path} has no {' or '.join(lacking)} file (a .conllu whose name holds "
                          f"'{lacking[0]}'); pass a UD treebank folder or its files.")
    return files


def ud_task(name: str, treebank, max_words: dict[str, int | None], seed: int = 0) -> ProbeTask:
    """``upos`` (17 tags) or ``deprel`` (coarse relations) on a UD treebank's train / dev / test.

    Without a train file, probe-train and probe-dev are taken from dev: its sentences, shuffled with ``seed``,
    split 80 / 20 (said in :attr:`ProbeTask.note`). ``max_words[split]`` caps a split by taking a seeded random
    subset of its sentences (whole sentences, so every word keeps its context); None keeps them all.
    """
    if name not in UD_TASKS:
        raise ConfigError(f"task={name} is not a UD task; use one of {', '.join(UD_TASKS)}.")
    files = treebank_files(treebank)
    sentences = {s: read_conllu(f) for s, f in files.items()}
    note = ""
    if "train" not in sentences:
        dev = sentences["dev"]
        order = list(range(len(dev)))
        random.Random(seed).shuffle(order)
        cut = int(0.8 * len(order))
        sentences["train"] = [dev[i] for i in sorted(order[:cut])]
        sentences["dev"] = [dev[i] for i in sorted(order[cut:])]
        note = (f"no train file: probe-train is a seeded 80% of {files['dev'].name}'s sentences, probe-dev the "
                f"other 20%")
    sentences = {s: sentences[s] for s in SPLITS}
    if name == "upos":
        classes = list(UPOS)
    else:
        classes = sorted({r for s in sentences["train"] for r in s.deprel})
    index = {c: i for i, c in enumerate(classes)}
    rng = random.Random(seed)
    splits = {}
    for split, sents in sentences.items():
        sents = _subsample(sents, max_words.get(split), rng)
        text = join_sentences([s.text for s in sents])
        spans, labels, types, offset = [], [], [], 0
        for s in sents:
            tags = s.upos if name == "upos" else s.deprel
            for form, tag, start, end in zip(s.forms, tags, s.starts, s.ends):
                if tag not in index:  # a dev/test relation never seen in train: no class to predict
                    continue
                spans.append((offset + start, offset + end))
                labels.append(index[tag])
                types.append(form)
            offset += len(s.text) + 1  # the separator
        spans = np.array(spans, dtype=np.int64).reshape(-1, 2)
        splits[split] = Split(text, None, spans[:, 1].copy(), np.array(labels), types, starts=spans[:, 0].copy())
    return ProbeTask(name, "ud", classes, splits, treebank=treebank_name(list(files.values())), note=note)


def synthetic_task(name: str, corpus_seed: int, words: dict[str, int]) -> ProbeTask:
    """A synthetic task on fresh corpora of the run's grammar (streams the run never trained on).

    ``words[split]`` is the length of the split's token stream; ``role`` probes the nouns in it.
    """
    if name not in SYNTHETIC_TASKS:
        raise ConfigError(f"task={name} is not a synthetic-language task; use one of {', '.join(SYNTHETIC_TASKS)}.")
    grammar = Grammar(corpus_seed)
    splits = {}
    for i, split in enumerate(SPLITS):
        corpus = grammar.corpus(words[split], seed=corpus_seed * 2 + 10 + i)  # training uses *2+1, *2+2
        tokens = corpus.tokens.numpy()
        positions = np.arange(len(tokens))
        if name == "agreement":
            labels = corpus.agreement.numpy() - 1  # sg, pl: every token has one
        elif name == "role":
            positions = np.flatnonzero(corpus.role.numpy())
            labels = corpus.role.numpy()[positions] - 1
        elif name == "depth":
            labels = corpus.depth.clamp(max=grammar.max_depth).numpy()
        else:
            labels = corpus.category.numpy()
        splits[split] = Split(None, tokens, positions, labels, [grammar.vocab[t] for t in tokens[positions]])
    classes = {"agreement": list(NUMBERS[1:]), "role": list(ROLES[1:]), "category": list(CATEGORIES),
               "depth": [str(d) for d in range(grammar.max_depth + 1)]}[name]
    return ProbeTask(name, "synthetic", classes, splits)


def task_labels(task) -> tuple[str, ...]:
    """The probe labels a :class:`locallearn.data.tasks.Task` exports."""
    return tuple(task.label_classes)


def task_probe(name: str, task, task_seed: int, words: dict[str, int]) -> ProbeTask:
    """Probe label ``name`` of a synthetic task on fresh examples (the run trained on seeds ``task_seed*2+1`` and
    validated on ``*2+2``); ``words[split]`` labelled tokens at least, in whole examples."""
    if name not in task.label_classes:
        raise ConfigError(f"task={name} is not a probe label of data={task.name}; use one of "
                          f"{', '.join(task_labels(task))}.")
    T = task.length - 1  # the model reads an example's first T tokens, as in training
    splits = {}
    for i, split in enumerate(SPLITS):
        probe_ex = task.generate(1, seed=task_seed * 2 + 10 + i)
        per_example = max(int((probe_ex.labels[name][:, :T] >= 0).sum()), 1)
        ex = task.generate(-(-words[split] // per_example), seed=task_seed * 2 + 10 + i)
        tokens = ex.tokens[:, :T].reshape(-1).numpy()
        flat = ex.labels[name][:, :T].reshape(-1).numpy()
        positions = np.flatnonzero(flat >= 0)
        splits[split] = Split(None, tokens, positions, flat[positions], [task.vocab[t] for t in tokens[positions]],
                              example_len=T)
    return ProbeTask(name, task.name, list(task.label_classes[name]), splits)


def label_distribution(task: ProbeTask, split: str = "train") -> Counter:
    return Counter(task.classes[i] for i in task.splits[split].labels)


def _subsample(sents, cap, rng):
    if cap is None or sum(len(s.forms) for s in sents) <= cap:
        return sents
    order = list(range(len(sents)))
    rng.shuffle(order)
    keep, n = [], 0
    for i in order:
        if n >= cap:
            break
        keep.append(i)
        n += len(sents[i].forms)
    return [sents[i] for i in sorted(keep)]
