"""The data layer: the synthetic language and its labels, training/validation windows, text corpora."""

import hashlib
import itertools
import json
import math
from collections import Counter

import pytest
import torch

from locallearn.data import Grammar, SyntheticDataModule, TextDataModule, TokenDataModule
from locallearn.data.synthetic import CATEGORIES, NUMBERS, ROLES
from locallearn.data.windows import RandomWindows, fixed_windows
from locallearn.errors import ConfigError
from tests.conftest import SHARED_DATA

SMALL = dict(batch_size=8, block_size=16, n_train_tokens=20000, n_val_tokens=4000)
CAT = {name: i for i, name in enumerate(CATEGORIES)}
NUM = {name: i for i, name in enumerate(NUMBERS)}
ROLE = {name: i for i, name in enumerate(ROLES)}
# sha256 of Grammar(1234).corpus(200000, seed=2469)'s fields, recorded before `agreement` and `role` were added:
# recording labels must not change the stream (or the older labels) of any corpus seed.
STREAM_SHA256 = {
    "tokens": "7378928c24b86562c56a79991ae88e57212f7a41f034295d1377b494173195aa",
    "depth": "a776a87ee66a62753e17f693397fdb7d16684016fec28e1ef1060e15baaefd47",
    "category": "1345f3adef919aac2c980334582b554083c006edff3ad102d2e7c2bd9499b9e6",
    "number": "d1c791a7c2679e438cf83403452d06730c88247ab18c5f48e015105b849188b9",
}


@pytest.fixture(scope="module")
def dm():
    return SyntheticDataModule(**SMALL)


@pytest.fixture(scope="module")
def big():
    return Grammar(1234).corpus(200000, seed=2469)


def sentences(corpus, stop: int):
    """(start, end) index ranges of the complete sentences of a corpus, "." included."""
    ends = (corpus.tokens == stop).nonzero().flatten().tolist()
    return list(zip([0, *(e + 1 for e in ends[:-1])], [e + 1 for e in ends]))


# -- the synthetic corpus -----------------------------------------------------------------------


def test_synthetic_corpus_is_deterministic_per_seed():
    a = SyntheticDataModule(**SMALL, corpus_seed=7)
    b = SyntheticDataModule(**SMALL, corpus_seed=7)
    c = SyntheticDataModule(**SMALL, corpus_seed=8)
    assert a.vocab == b.vocab
    for split in ("train_corpus", "val_corpus"):
        x, y = getattr(a, split), getattr(b, split)
        for field in ("tokens", "category", "depth", "number", "agreement", "role"):
            assert torch.equal(getattr(x, field), getattr(y, field)), (split, field)
    assert not torch.equal(a.train_tokens, c.train_tokens)
    assert not torch.equal(a.val_tokens, c.val_tokens)
    # train and val are different streams, and the lengths are the ones asked for
    assert not torch.equal(a.train_tokens[:4000], a.val_tokens)
    assert len(a.train_tokens) == SMALL["n_train_tokens"] and len(a.val_tokens) == SMALL["n_val_tokens"]
    # the Grammar itself: same seeds -> same sample, different sample seed -> different sample
    g1, g2 = Grammar(3), Grammar(3)
    assert torch.equal(g1.corpus(500, seed=1).tokens, g2.corpus(500, seed=1).tokens)
    assert not torch.equal(g1.corpus(500, seed=1).tokens, g1.corpus(500, seed=2).tokens)


@pytest.mark.parametrize("split", ["train_corpus", "val_corpus"])
def test_labels_are_the_grammar_categories_and_numbers_of_each_token(dm, split):
    corpus, g = getattr(dm, split), dm.grammar
    n = len(corpus.tokens)
    assert len(corpus.category) == len(corpus.depth) == len(corpus.number) == n
    assert len(corpus.agreement) == len(corpus.role) == n
    assert corpus.category.tolist() == [g.cat_of[t] for t in corpus.tokens.tolist()]
    assert corpus.number.tolist() == [g.num_of[t] for t in corpus.tokens.tolist()]
    # the lexicon's categories are the ones its word lists say
    for t in (*g.dets["sg"], *g.dets["pl"]):
        assert g.cat_of[t] == CAT["DET"]
    for num in ("sg", "pl"):
        assert {g.cat_of[t] for t in g.nouns[num]} == {CAT["NOUN"]}
        assert {g.num_of[t] for t in g.nouns[num]} == {NUM[num]}
        assert {g.cat_of[t] for t in g.verbs[num]} == {CAT["VERB"]}
        assert {g.num_of[t] for t in g.verbs[num]} == {NUM[num]}
    assert g.cat_of[g.stop] == CAT["PUNCT"] and g.cat_of[g.that] == CAT["COMP"] and g.cat_of[g.and_] == CAT["CONJ"]
    # every category actually occurs
    assert set(corpus.category.tolist()) == set(range(len(CATEGORIES)))


@pytest.mark.parametrize("split", ["train_corpus", "val_corpus"])
def test_depth_labels_follow_the_sentence_structure(dm, split):
    corpus, g = getattr(dm, split), dm.grammar
    tok, cat, depth = corpus.tokens, corpus.category, corpus.depth
    assert int(depth.min()) >= 0 and int(depth.max()) <= Grammar.max_depth + 1
    assert int(depth.max()) >= 2  # nesting actually happens
    stops = tok == g.stop
    assert stops.sum() > 100
    assert (depth[stops] == 0).all()
    assert (cat[stops] == CAT["PUNCT"]).all()
    # "." ends every sentence: the next sentence starts with a determiner in the main clause
    after = stops.nonzero().flatten() + 1
    after = after[after < len(tok)]
    assert (cat[after] == CAT["DET"]).all() and (depth[after] == 0).all()
    assert cat[0] == CAT["DET"] and depth[0] == 0
    # ... and the word before "." closes a phrase: a noun or an intransitive verb
    before = stops.nonzero().flatten() - 1
    assert set(cat[before].tolist()) <= {CAT["NOUN"], CAT["VERB"]}
    # "that" and prepositions open a deeper phrase: depth >= 1, and the phrase they open is at their depth
    for name in ("COMP", "PREP"):
        at = (cat == CAT[name]).nonzero().flatten()
        assert len(at) > 10, name
        assert (depth[at] >= 1).all(), name
        at = at[at + 1 < len(tok)]
        assert (depth[at + 1] == depth[at]).all(), name
        assert (depth[at - 1] >= depth[at] - 1).all(), name  # one level deeper than the enclosing phrase
    # after "that" comes the verb of the relative clause; after a preposition, a determiner
    comp = (cat == CAT["COMP"]).nonzero().flatten()
    comp = comp[comp + 1 < len(tok)]
    assert (cat[comp + 1] == CAT["VERB"]).all()
    prep = (cat == CAT["PREP"]).nonzero().flatten()
    prep = prep[prep + 1 < len(tok)]
    assert (cat[prep + 1] == CAT["DET"]).all()


@pytest.mark.parametrize("split", ["train_corpus", "val_corpus"])
def test_determiner_noun_agreement(dm, split):
    corpus = getattr(dm, split)
    cat, num, depth = corpus.category.tolist(), corpus.number.tolist(), corpus.depth.tolist()
    nouns = [i for i, c in enumerate(cat) if c == CAT["NOUN"]]
    assert len(nouns) > 1000
    n_adj = 0
    for i in nouns:
        j = i - 1
        while cat[j] == CAT["ADJ"]:
            assert depth[j] == depth[i]
            j -= 1
            n_adj += 1
        assert cat[j] == CAT["DET"], f"noun at {i} is preceded by category {CATEGORIES[cat[j]]}"
        assert num[j] in (NUM["none"], num[i]), f"determiner at {j} does not agree with the noun at {i}"
        assert depth[j] == depth[i]
        assert num[i] in (NUM["sg"], NUM["pl"])
    assert n_adj > 100  # adjectives do occur between determiner and noun


def test_main_clause_verbs_agree_with_the_subject(dm):
    """Long-range agreement: every depth-0 verb of a sentence has the number of its first noun."""
    corpus = dm.train_corpus
    cat, num, depth = corpus.category.tolist(), corpus.number.tolist(), corpus.depth.tolist()
    checked = 0
    for start, end in sentences(corpus, dm.grammar.stop):
        subject = next(i for i in range(start, end) if cat[i] == CAT["NOUN"])
        verbs = [i for i in range(subject, end) if cat[i] == CAT["VERB"] and depth[i] == 0]
        assert verbs, f"sentence at {start} has no main verb"
        assert all(num[v] == num[subject] for v in verbs), f"sentence at {start}"
        checked += 1
    assert checked > 500


def test_recording_labels_leaves_the_token_stream_unchanged(big):
    for field, digest in STREAM_SHA256.items():
        assert hashlib.sha256(getattr(big, field).numpy().tobytes()).hexdigest() == digest, field


@pytest.mark.parametrize("split", ["train_corpus", "val_corpus"])
def test_agreement_is_the_number_of_the_tokens_clause(dm, split):
    corpus, g = getattr(dm, split), dm.grammar
    tok, cat, num = corpus.tokens.tolist(), corpus.category.tolist(), corpus.number.tolist()
    depth, agr, role = corpus.depth.tolist(), corpus.agreement.tolist(), corpus.role.tolist()
    assert set(agr) == {NUM["sg"], NUM["pl"]}  # every token has one
    for i, t in enumerate(tok):
        if cat[i] == CAT["VERB"]:
            assert agr[i] == num[i], i  # a verb agrees with its clause
        if t in (g.that, g.and_) and i + 1 < len(tok):
            assert agr[i] == num[i + 1], i  # ... and "that" / "and" open (or continue) the clause of the next verb
    for start, end in sentences(corpus, g.stop):
        subject = next(i for i in range(start, end) if cat[i] == CAT["NOUN"])
        assert role[subject] == ROLE["subject"]
        # the main clause (every token outside phrases and relative clauses, "." too) agrees with its subject
        assert all(agr[i] == num[subject] for i in range(start, end) if depth[i] == 0), start


def test_agreement_follows_the_clause_not_the_nearest_noun(big):
    """ "the dog near the cats that sleep runs .": the relative clause can modify "cats" or "dog"; the
    number of its verb says which. Everything outside it belongs to the main clause (the subject's number)."""
    tok, cat, num = big.tokens.tolist(), big.category.tolist(), big.number.tolist()
    shape = [CAT[c] for c in ("DET", "NOUN", "PREP", "DET", "NOUN", "COMP", "VERB")]
    seen = {"inner": 0, "outer": 0}
    for i in range(1, len(tok) - len(shape)):
        if cat[i - 1] != CAT["PUNCT"] or cat[i:i + 7] != shape or num[i + 1] == num[i + 4]:
            continue
        dog, cats = num[i + 1], num[i + 4]
        inner = num[i + 6] == cats  # the relative clause modifies "cats"
        seen["inner" if inner else "outer"] += 1
        rc = cats if inner else dog
        assert big.agreement[i:i + 7].tolist() == [dog] * 5 + [rc] * 2, i
        assert big.depth[i:i + 7].tolist() == [0, 0, 1, 1, 1] + ([2, 2] if inner else [1, 1]), i
        assert big.role[i:i + 7].tolist() == [0, ROLE["subject"], 0, 0, ROLE["pobj"], 0, 0], i
    assert min(seen.values()) > 50, seen


@pytest.mark.parametrize("split", ["train_corpus", "val_corpus"])
def test_role_is_the_role_of_the_noun_phrase_each_noun_heads(dm, split):
    corpus = getattr(dm, split)
    cat, role = corpus.category.tolist(), corpus.role.tolist()
    found = set()
    for i, c in enumerate(cat):
        if c != CAT["NOUN"]:
            assert role[i] == ROLE["none"], i
            continue
        det = i - 1
        while cat[det] == CAT["ADJ"]:
            det -= 1
        before = cat[det - 1] if det > 0 else CAT["PUNCT"]  # what introduces the noun phrase
        expected = {CAT["PUNCT"]: "subject", CAT["VERB"]: "object", CAT["PREP"]: "pobj"}[before]
        assert role[i] == ROLE[expected], i
        found.add(expected)
    assert found == {"subject", "object", "pobj"}


def test_which_labels_are_functions_of_the_token_id(big):
    """category and number are lexical; depth, agreement and role are not: most token ids carry several."""
    tok = big.tokens.numpy()
    ambiguous = {}
    for field in ("category", "number", "depth", "agreement", "role"):
        labels = getattr(big, field).numpy()
        keep = labels > 0 if field == "role" else labels >= 0  # role: nouns only
        labels_per_id = Counter(t for t, _ in set(zip(tok[keep].tolist(), labels[keep].tolist())))
        ambiguous[field] = (sum(n > 1 for n in labels_per_id.values()), len(labels_per_id))
    assert ambiguous["category"][0] == 0 and ambiguous["number"][0] == 0, ambiguous
    assert ambiguous["depth"][0] > 0.9 * ambiguous["depth"][1], ambiguous  # every word can be nested
    assert ambiguous["role"][0] == ambiguous["role"][1] == 120, ambiguous  # every noun in every role
    # agreement: every token but the verbs, which carry their own number (40 verbs, 2 forms)
    assert ambiguous["agreement"] == (ambiguous["agreement"][1] - 80, 248), ambiguous


def test_bigram_model_beats_unigram_but_language_is_not_trivial(dm):
    V, alpha = dm.vocab_size, 0.1
    train, val = dm.train_tokens, dm.val_tokens
    counts = torch.zeros(V, V, dtype=torch.float64)
    counts.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1, dtype=torch.float64), accumulate=True)
    probs = (counts + alpha) / (counts + alpha).sum(1, keepdim=True)
    bigram_ce = float(-probs[val[:-1], val[1:]].log().mean())
    unigram = dm.unigram_entropy()
    assert bigram_ce < unigram - 0.5, (bigram_ce, unigram)
    assert bigram_ce > 1.0, bigram_ce
    assert unigram < math.log(V)  # Zipfian words: below the uniform entropy


# -- windows ------------------------------------------------------------------------------------


def test_training_batch_n_is_reproducible_from_any_start():
    tokens = torch.arange(1000)
    from_zero = list(itertools.islice(iter(RandomWindows(tokens, 16, 8, seed=3)), 10))
    from_five = list(itertools.islice(iter(RandomWindows(tokens, 16, 8, seed=3, start=5)), 5))
    for k, batch in enumerate(from_five):
        assert torch.equal(batch, from_zero[5 + k])
    again = list(itertools.islice(iter(RandomWindows(tokens, 16, 8, seed=3)), 10))
    assert all(torch.equal(a, b) for a, b in zip(from_zero, again))
    assert torch.equal(RandomWindows(tokens, 16, 8, seed=3).batch(7), from_zero[7])
    # consecutive batches differ, and so do batches of another seed
    assert not torch.equal(from_zero[0], from_zero[1])
    other = list(itertools.islice(iter(RandomWindows(tokens, 16, 8, seed=4)), 10))
    assert all(not torch.equal(a, b) for a, b in zip(from_zero, other))


def test_training_batches_are_contiguous_windows_of_the_stream():
    tokens = torch.arange(1000)
    for batch in itertools.islice(iter(RandomWindows(tokens, 16, 8, seed=0)), 20):
        assert batch.shape == (8, 17)
        assert batch.dtype == tokens.dtype
        assert (batch.diff(dim=1) == 1).all()  # contiguous slices
        assert (batch[:, 0] >= 0).all() and (batch[:, -1] <= 999).all()
    # windows reach both ends of the stream over many batches
    starts = torch.cat([RandomWindows(tokens, 16, 8, seed=0).batch(n)[:, 0] for n in range(300)])
    assert int(starts.min()) < 20 and int(starts.max()) > 1000 - 17 - 20


def test_datamodule_dataloaders(dm):
    train_batches = list(itertools.islice(iter(dm.train_dataloader()), 3))
    W = dm.block_size + 1
    for n, batch in enumerate(train_batches):
        assert batch.shape == (dm.batch_size, W)
        assert torch.equal(batch, RandomWindows(dm.train_tokens, dm.block_size, dm.batch_size, dm.seed).batch(n))
        for row in batch:  # each row is the stream at some offset
            hits = (dm.train_tokens.unfold(0, W, 1) == row).all(1)
            assert hits.any()
    val1, val2 = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(val1) == math.ceil(dm.val_windows / dm.batch_size)
    assert sum(len(b) for b in val1) == dm.val_windows
    assert all(torch.equal(a, b) for a, b in zip(val1, val2))
    windows = torch.cat(val1)
    assert windows.shape == (dm.val_windows, W)
    assert torch.equal(windows, fixed_windows(dm.val_tokens, dm.block_size, dm.val_windows, dm.val_seed))
    stream = dm.val_tokens.unfold(0, W, 1)
    assert all((stream == row).all(1).any() for row in windows[:32])
    # a different run seed changes the training batches but not the validation set
    dm2 = SyntheticDataModule(**SMALL, seed=1)
    assert not torch.equal(next(iter(dm2.train_dataloader())), train_batches[0])
    assert torch.equal(torch.cat(list(dm2.val_dataloader())), windows)


# -- text corpora -------------------------------------------------------------------------------

TEXT = "Où est la café? Naïve façade — 'déjà vu'.\nThe quick brown fox jumps over the lazy dog.\n" * 8


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_text_vocab_split_and_round_trip(text_file, tmp_path):
    dm = TextDataModule(text_file, batch_size=4, block_size=8)
    assert dm.vocab == sorted(set(TEXT))
    assert "é" in dm.vocab and "—" in dm.vocab
    assert dm.vocab_size == len(set(TEXT))
    n_train = int(len(TEXT) * 0.9)
    assert dm.train_tokens.tolist() == dm.encode(TEXT[:n_train])
    assert dm.val_tokens.tolist() == dm.encode(TEXT[n_train:])
    assert len(dm.train_tokens) + len(dm.val_tokens) == len(TEXT)
    assert dm.decode(dm.train_tokens.tolist()) + dm.decode(dm.val_tokens.tolist()) == TEXT
    for s in ("déjà vu", "façade — Où", TEXT):
        assert dm.decode(dm.encode(s)) == s
    assert dm.encode("ab") == [dm.vocab.index("a"), dm.vocab.index("b")]

    out = tmp_path / "run"
    out.mkdir()
    path = dm.save_vocab(out)
    assert path == out / "vocab.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["tokens"] == dm.vocab
    assert saved["data"] == "text"


def test_text_val_fraction(text_file):
    dm = TextDataModule(text_file, batch_size=4, block_size=8, val_fraction=0.25)
    n_train = int(len(TEXT) * 0.75)
    assert dm.decode(dm.train_tokens.tolist()) == TEXT[:n_train]
    assert dm.decode(dm.val_tokens.tolist()) == TEXT[n_train:]


# -- unigram entropy ----------------------------------------------------------------------------


def token_module(tokens, vocab_size):
    dm = TokenDataModule(batch_size=1, block_size=1)
    dm.train_tokens = torch.tensor(tokens, dtype=torch.long)
    dm.vocab = [str(i) for i in range(vocab_size)]
    return dm


@pytest.mark.parametrize(
    "tokens, vocab_size, expected",
    [
        ([0, 0, 1, 2], 4, 1.5 * math.log(2)),  # p = 1/2, 1/4, 1/4; id 3 never occurs
        ([2, 2, 2], 3, 0.0),
        ([0, 1, 2, 3, 4], 5, math.log(5)),
        ([0, 0, 0, 1], 2, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
    ],
    ids=["half-quarter-quarter-unused-id", "one-token", "uniform-5", "three-to-one"],
)
def test_unigram_entropy_by_hand(tokens, vocab_size, expected):
    assert token_module(tokens, vocab_size).unigram_entropy() == pytest.approx(expected, abs=1e-12)


def test_unigram_entropy_of_the_synthetic_corpus(dm):
    counts = torch.bincount(dm.train_tokens).double()
    p = counts[counts > 0] / len(dm.train_tokens)
    assert dm.unigram_entropy() == pytest.approx(float(-(p * p.log()).sum()))


@pytest.mark.shared_data
def test_ewt_data_is_the_treebank_sentences_joined_by_the_separator():
    from locallearn.data.conllu import read_conllu
    from locallearn.data.ewt import SEPARATOR, EWTDataModule

    root = SHARED_DATA / "ud-english-ewt"
    dm = EWTDataModule(root, batch_size=4, block_size=16)
    text = "".join(dm.vocab[i] for i in dm.val_tokens.tolist())
    dev = read_conllu(root / "en_ewt-ud-dev.conllu")
    assert text == "".join(s.text + SEPARATOR for s in dev)
    assert int((dm.train_tokens == dm.vocab.index(SEPARATOR)).sum()) == 12544  # one per train sentence


def test_ewt_data_without_the_treebank_names_the_missing_files(tmp_path):
    from locallearn.data.ewt import EWTDataModule

    with pytest.raises(ConfigError, match=r"data.path=.* lacks .*en_ewt-ud-train.conllu.*point data.path at"):
        EWTDataModule(tmp_path, batch_size=4, block_size=16)
