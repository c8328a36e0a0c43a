"""An embedded synthetic language: a small probabilistic grammar with nesting and agreement.

No download: the corpus is generated from a seed. Every token comes with latent labels kept for
probing (see :class:`Corpus`): its word category and grammatical number (both fixed by the token
id), and three that depend on its context: its nesting depth, the number its clause's verb agrees
with, and for nouns the role of their noun phrase. The language has structure at several ranges, so
that it is learnable but not trivial:

* local: category order (determiner, adjectives, noun ...), determiner-noun number agreement;
* mid-range: a transitive verb prefers objects of one semantic class, adjectives prefer nouns of theirs;
* long-range: a verb agrees in number with its subject across nested phrases and clauses
  ("the dog near the cats that sleep *runs*").

Grammar (n = number, d = depth; probabilities shrink with depth so sentences stay finite)::

    S     -> NP[n] VP[n] "."
    NP[n] -> DET[n] ADJ* NOUN[n] (PP)? (RC[n])?
    PP    -> PREP NP[any]                     depth + 1
    RC[n] -> "that" VP[n]                     depth + 1
    VP[n] -> VERB_intr[n] (PP)? | VERB_tr[n] NP[any] ;  (("and" VP[n]))?
"""

import itertools
import random
from dataclasses import dataclass

import torch

from locallearn.data.base import TokenDataModule

CATEGORIES = ("PUNCT", "DET", "ADJ", "NOUN", "VERB", "PREP", "COMP", "CONJ")
NUMBERS = ("none", "sg", "pl")
ROLES = ("none", "subject", "object", "pobj")
_SUBJ, _OBJ, _POBJ = 1, 2, 3
_ONSETS = "b d f g k l m n p r s t v z br dr gl kr pl sl st tr".split()
_VOWELS = "a e i o u ai ou".split()
_CODAS = ["", "", "n", "m", "l", "r", "k", "p", "t", "x"]


@dataclass
class Corpus:
    """A token stream and its per-token latent labels (all 1-D, same length).

    ``category`` and ``number`` are the lexicon's: functions of the token id. The others are not:

    * ``depth``: how many prepositional phrases and relative clauses enclose the token (0 = the main
      clause outside any of them; a preposition or "that" belongs to the phrase it opens).
    * ``agreement``: the number (sg / pl) that the verb of the token's clause agrees with. The clauses
      are the sentence (S -> NP VP ".") and every relative clause (RC[n] -> "that" VP[n]); a token
      belongs to the innermost clause that contains it (prepositional and noun phrases open none).
      A sentence agrees with its subject; a relative clause with the noun phrase it modifies. In
      "the dog near the cats that sleep runs ." with the relative clause on "cats", "the dog near the
      cats runs ." are sg (the main clause: "runs" agrees with "dog") and "that sleep" pl. Verbs and
      subject nouns carry their own number; every other token's label comes from its context alone.
    * ``role``: for a noun, the role of the noun phrase it heads: subject (of the sentence), object
      (of a transitive verb) or pobj (the object of a preposition); "none" for every other token.
    """

    tokens: torch.Tensor  # token ids
    category: torch.Tensor  # index into CATEGORIES
    depth: torch.Tensor  # nesting depth, 0 = main clause
    number: torch.Tensor  # index into NUMBERS
    agreement: torch.Tensor  # index into NUMBERS: the clause's number, sg or pl, for every token
    role: torch.Tensor  # index into ROLES


class Grammar:
    """The lexicon and the rules, fixed by ``seed``; :meth:`corpus` samples text from them."""

    max_depth = 6

    def __init__(self, seed: int = 1234, n_nouns: int = 60, n_verbs: int = 40, n_adjs: int = 30,
                 n_preps: int = 8, n_classes: int = 4):
        rng = random.Random(seed)
        stems = self._pseudo_words(rng, n_nouns + n_verbs + n_adjs + n_preps)
        nouns, stems = stems[:n_nouns], stems[n_nouns:]
        verbs, stems = stems[:n_verbs], stems[n_verbs:]
        adjs, preps = stems[:n_adjs], stems[n_adjs:]
        self.vocab: list[str] = []
        self.cat_of: list[int] = []
        self.num_of: list[int] = []

        def add(word, cat, num="none"):
            self.vocab.append(word)
            self.cat_of.append(CATEGORIES.index(cat))
            self.num_of.append(NUMBERS.index(num))
            return len(self.vocab) - 1

        self.stop = add(".", "PUNCT")
        self.that = add("that", "COMP")
        self.and_ = add("and", "CONJ")
        self.dets = {"sg": [add(w, "DET", "sg") for w in ("a", "every", "this")] + [add("the", "DET")],
                     "pl": [add(w, "DET", "pl") for w in ("these", "many", "two")]}
        self.dets["pl"].append(self.dets["sg"][-1])  # "the" goes with both numbers
        self.n_classes = n_classes
        # Nouns: a singular and a plural form each, and a semantic class.
        self.noun_class = [rng.randrange(n_classes) for _ in nouns]
        self.nouns = {"sg": [add(w, "NOUN", "sg") for w in nouns], "pl": [add(w + "s", "NOUN", "pl") for w in nouns]}
        # Verbs: "zims" (sg) / "zim" (pl); a third are intransitive; the others select an object class.
        self.transitive = [i % 3 != 0 for i in range(n_verbs)]
        self.obj_class = [rng.randrange(n_classes) for _ in verbs]
        self.verbs = {"sg": [add(w + "s", "VERB", "sg") for w in verbs], "pl": [add(w, "VERB", "pl") for w in verbs]}
        self.adj_class = [rng.randrange(n_classes) for _ in adjs]
        self.adjs = [add(w, "ADJ") for w in adjs]
        self.preps = [add(w, "PREP") for w in preps]
        # Zipfian word frequencies within every category, in a seeded order; cumulative tables per
        # (kind, class) are precomputed because sampling is the hot loop of corpus generation.
        prefs = {"noun": self.noun_class, "verb": None, "adj": self.adj_class, "prep": None}
        self._cum = {}
        for kind, n in (("noun", n_nouns), ("verb", n_verbs), ("adj", n_adjs), ("prep", n_preps)):
            ranks = list(range(n))
            rng.shuffle(ranks)
            weights = [1.0 / (1 + r) for r in ranks]
            self._cum[kind, None] = list(itertools.accumulate(weights))
            for c in range(n_classes) if prefs[kind] else ():
                in_class = (w * (prefs[kind][i] == c) for i, w in enumerate(weights))
                self._cum[kind, c] = list(itertools.accumulate(in_class))
                if self._cum[kind, c][-1] == 0:  # no word of this class: fall back to all words
                    self._cum[kind, c] = self._cum[kind, None]
        self._index = {kind: range(n) for kind, n in (("noun", n_nouns), ("verb", n_verbs), ("adj", n_adjs),
                                                        ("prep", n_preps))}

    @staticmethod
    def _pseudo_words(rng: random.Random, n: int) -> list[str]:
        words: list[str] = []
        seen = {"a", "the", "that", "and", "every", "this", "these", "many", "two"}
        while len(words) < n:
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((1, 2))))
            w += rng.choice(_CODAS)
            if w not in seen and w + "s" not in seen and not w.endswith("s"):
                seen.update((w, w + "s"))
                words.append(w)
        return words

    # -- sampling: each rule appends (token, depth, clause number, role) to ``out`` -----------
    # The labels are bookkeeping only: no random draw depends on them, so the token stream of a
    # seed is the same as before they were recorded.
    def _pick(self, rng, kind: str, cls=None, strength: float = 0.8) -> int:
        """Index of a Zipf-distributed word; with probability ``strength`` one of class ``cls``."""
        table = self._cum[kind, cls if cls is not None and rng.random() < strength else None]
        return rng.choices(self._index[kind], cum_weights=table)[0]

    def _np(self, rng, out, num, d, clause, role, cls=None):
        out.append((rng.choice(self.dets[num]), d, clause, 0))
        noun = self._pick(rng, "noun", cls)
        while rng.random() < 0.3 and len(out) < 400:
            out.append((self.adjs[self._pick(rng, "adj", self.noun_class[noun], 0.7)], d, clause, 0))
        out.append((self.nouns[num][noun], d, clause, role))
        if d < self.max_depth and rng.random() < 0.3 * 0.6**d:
            out.append((self.preps[self._pick(rng, "prep")], d + 1, clause, 0))
            self._np(rng, out, rng.choice(NUMBERS[1:]), d + 1, clause, _POBJ)
        if d < self.max_depth and rng.random() < 0.25 * 0.6**d:
            out.append((self.that, d + 1, NUMBERS.index(num), 0))  # the relative clause agrees with this phrase
            self._vp(rng, out, num, d + 1)

    def _vp(self, rng, out, num, d):
        clause = NUMBERS.index(num)  # the verb agrees with its clause, and so do the phrases below it
        verb = self._pick(rng, "verb")
        out.append((self.verbs[num][verb], d, clause, 0))
        if self.transitive[verb]:
            self._np(rng, out, rng.choice(NUMBERS[1:]), d, clause, _OBJ, cls=self.obj_class[verb])
        elif d < self.max_depth and rng.random() < 0.3:
            out.append((self.preps[self._pick(rng, "prep")], d + 1, clause, 0))
            self._np(rng, out, rng.choice(NUMBERS[1:]), d + 1, clause, _POBJ)
        if rng.random() < 0.15 * 0.5**d:
            out.append((self.and_, d, clause, 0))
            self._vp(rng, out, num, d)

    def sentence(self, rng: random.Random) -> list[tuple[int, int, int, int]]:
        """One sentence as (token id, depth, agreement, role) tuples (see :class:`Corpus`), ending with "."."""
        out: list[tuple[int, int, int, int]] = []
        num = rng.choice(NUMBERS[1:])
        clause = NUMBERS.index(num)
        self._np(rng, out, num, 0, clause, _SUBJ)
        self._vp(rng, out, num, 0)
        out.append((self.stop, 0, clause, 0))
        return out

    def corpus(self, n_tokens: int, seed: int) -> Corpus:
        """Whole sentences, concatenated, until at least ``n_tokens`` tokens (then cut to length)."""
        rng = random.Random(seed)
        rows: list[tuple[int, int, int, int]] = []
        while len(rows) < n_tokens:
            rows.extend(self.sentence(rng))
        del rows[n_tokens:]
        tokens, depth, agreement, role = torch.tensor(rows, dtype=torch.long).reshape(-1, 4).T.contiguous()
        return Corpus(tokens, torch.tensor(self.cat_of)[tokens], depth, torch.tensor(self.num_of)[tokens],
                      agreement, role)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)


class SyntheticDataModule(TokenDataModule):
    """The synthetic language as a data module; ``train_corpus``/``val_corpus`` keep the labels."""

    name = "synthetic"

    def __init__(self, batch_size: int, block_size: int, corpus_seed: int = 1234, n_train_tokens: int = 1_000_000,
                 n_val_tokens: int = 100_000, **kwargs):
        super().__init__(batch_size, block_size, **kwargs)
        self.grammar = Grammar(corpus_seed)
        # Different streams for train and val, both fixed by the corpus seed (not the run seed).
        self.train_corpus = self.grammar.corpus(int(n_train_tokens), seed=corpus_seed * 2 + 1)
        self.val_corpus = self.grammar.corpus(int(n_val_tokens), seed=corpus_seed * 2 + 2)
        self.train_tokens, self.val_tokens = self.train_corpus.tokens, self.val_corpus.tokens
        self.vocab = list(self.grammar.vocab)
        self.check_length(f"data=synthetic (n_train_tokens={n_train_tokens}, n_val_tokens={n_val_tokens})")
