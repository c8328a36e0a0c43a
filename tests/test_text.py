"""Text corpora as a language-model researcher uses them: tokenizers (char, bpe, word), validation and test files,
bits per character, evaluation of a trained run, probes on any UD treebank, and where runs say what they read."""

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from locallearn.config import PROJECT_ROOT, differences, upgrade_config
from locallearn.data import TextDataModule
from locallearn.data.tokenizer import TextTokenizer
from locallearn.errors import ConfigError
from locallearn.evaluate import evaluate, windows
from locallearn.names import treebank_name
from locallearn.probing.features import load_run, word_pieces
from locallearn.probing.report import probe_runs
from locallearn.probing.tasks import Split, treebank_files, ud_task
from locallearn.runner import build, saved_tokenizer, train
from tests.conftest import CONF_DIR, compose_config

TEXT = "Où est la café? Naïve façade — 'déjà vu'.\nThe quick brown fox jumps over the lazy dog's 12 bones.\n" * 20


# -- tokenizers ------------------------------------------------------------------------------------

def test_char_tokenizer_has_one_token_per_character_in_sorted_order():
    tok = TextTokenizer.train("char", [TEXT])
    assert tok.kind == "char" and tok.name == "char" and tok.vocab == sorted(set(TEXT))
    enc = tok.encode(TEXT)
    assert tok.decode(enc.ids) == TEXT and enc.chars.tolist() == [1] * len(TEXT) and enc.unknown == 0


def test_bpe_tokens_tile_the_text_and_training_is_deterministic():
    a, b = (TextTokenizer.train("bpe", [TEXT], vocab_size=80) for _ in range(2))
    assert a.kind == "bpe" and a.name == "bpe-80" and len(a) == 80
    assert a.hf.to_str() == b.hf.to_str()  # the same merges from the same text
    enc = a.encode(TEXT)
    assert len(enc.ids) < 0.6 * len(TEXT)  # merges happened
    assert a.decode(enc.ids) == TEXT and int(enc.chars.sum()) == len(TEXT)
    assert (enc.starts[1:] == enc.ends[:-1]).all()  # consecutive spans, no gap, no overlap
    assert all(TEXT[s:e] == a.vocab[i] for i, s, e in zip(enc.ids, enc.starts, enc.ends))


@pytest.mark.parametrize("kind, size", [("char", None), ("bpe", 70), ("word", 12)])
def test_a_saved_tokenizer_loads_back_as_the_same_tokenizer(tmp_path, kind, size):
    tok = TextTokenizer.train(kind, [TEXT], vocab_size=size)
    back = TextTokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    assert back.kind == kind and back.vocab == tok.vocab
    assert back.encode(TEXT).ids.tolist() == tok.encode(TEXT).ids.tolist()


def test_word_tokenizer_reads_rare_pieces_as_one_unk_covering_their_characters():
    tok = TextTokenizer.train("word", ["The quick fox. The quick cat. " * 10 + "Rare words seldom count."],
                              vocab_size=6)  # <unk> and the 5 pieces seen 10 times or more
    assert tok.vocab == ["<unk>", ".", " quick", " The", " cat", " fox"]
    enc = tok.encode(" The quick zebra.")
    assert [tok.vocab[i] for i in enc.ids] == [" The", " quick", "<unk>", "."] and enc.unknown == 1
    assert " The quick zebra."[enc.starts[2]:enc.ends[2]] == " zebra" and int(enc.chars.sum()) == 17


def test_characters_outside_the_alphabet_are_read_as_spaces_and_counted():
    tok = TextTokenizer.train("bpe", ["abc abc cab"], vocab_size=6)
    enc = tok.encode("abXc")
    assert tok.decode(enc.ids) == "ab c" and enc.unknown == 1 and int(enc.chars.sum()) == 4


@pytest.mark.parametrize("kind, size, error", [
    ("char", 100, r"^data.vocab_size=100 is set with data.tokenizer=char, whose vocabulary is the corpus's characters"),
    ("bpe", 5, r"^data.vocab_size=5 is too small for data.tokenizer=bpe: it needs at least \d+ tokens"),
    ("sentencepiece", None, r"^data.tokenizer=sentencepiece is not a tokenizer; use one of char, bpe, word\.$"),
])
def test_bad_tokenizer_settings_are_one_sentence(kind, size, error):
    with pytest.raises(ConfigError, match=error):
        TextTokenizer.train(kind, [TEXT], vocab_size=size)


# -- text files, splits, bits per character -------------------------------------------------------------

def test_text_from_a_folder_with_validation_and_test_files(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("first book\n" * 30, encoding="utf-8")
    (folder / "b.txt").write_text("second book" * 30, encoding="utf-8")  # no newline at its end
    (folder / ".hidden").write_text("never read", encoding="utf-8")
    (tmp_path / "val.txt").write_text("a third book\n" * 10, encoding="utf-8")
    (tmp_path / "test.txt").write_text("the third\n" * 10, encoding="utf-8")
    dm = TextDataModule(folder, batch_size=2, block_size=8, val_path=tmp_path / "val.txt",
                        test_path=tmp_path / "test.txt", tokenizer="bpe", vocab_size=30)
    assert dm.decode(dm.train_tokens.tolist()) == "first book\n" * 30 + "second book" * 30
    assert dm.decode(dm.val_tokens.tolist()) == "a third book\n" * 10
    assert dm.decode(dm.test_tokens.tolist()) == "the third\n" * 10 and dm.unknown == {"train": 0, "val": 0, "test": 0}
    prov = dm.provenance
    assert prov["name"] == "books" and prov["tokenizer"] == "bpe-30"
    assert [Path(f["path"]).name for f in prov["files"]["train"]] == ["a.txt", "b.txt"]
    assert prov["files"]["test"][0]["sha1"] == __import__("hashlib").sha1(b"the third\n" * 10).hexdigest()
    assert prov["characters"]["val"] == len("a third book\n" * 10)


@pytest.mark.parametrize("kwargs, error", [
    ({"val_path": "missing.txt"}, r"^data.val_path=.*missing.txt does not exist"),
    ({"test_path": "empty"}, r"^data.test_path=.*empty is a folder with no files in it"),
])
def test_missing_validation_or_test_files_are_refused(tmp_path, kwargs, error):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "empty").mkdir()
    kwargs = {k: str(tmp_path / v) for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=error):
        TextDataModule(tmp_path / "corpus.txt", batch_size=2, block_size=8, **kwargs)


def test_validation_characters_per_token_are_those_of_the_validation_windows(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    char = TextDataModule(tmp_path / "corpus.txt", batch_size=2, block_size=8, val_windows=20)
    assert char.val_chars_per_token == 1.0
    bpe = TextDataModule(tmp_path / "corpus.txt", batch_size=2, block_size=8, val_windows=20, tokenizer="bpe",
                         vocab_size=90)
    windows_ = next(iter(bpe.val_dataloader()))  # the first batch of the validation windows, as trained
    chars = [len(bpe.decode(w[1:].tolist())) for w in windows_]
    batches = [b for b in bpe.val_dataloader()]
    all_chars = sum(len(bpe.decode(w[1:].tolist())) for b in batches for w in b)
    assert chars and bpe.val_chars_per_token == pytest.approx(all_chars / (20 * 8))
    assert bpe.val_chars_per_token > 1.5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "toytext.txt").write_text(toy_text(400, seed=1), encoding="utf-8")
    (root / "test.txt").write_text(toy_text(60, seed=2), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def bpe_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe_run") / "run"
    cfg = compose_config(out, "data=text", f"data.path={corpus / 'toytext.txt'}", "data.tokenizer=bpe",
                         "data.vocab_size=48", "trainer.max_steps=12", "trainer.val_check_interval=6")
    return out, train(cfg)


def test_a_bpe_run_reports_bits_per_character_and_saves_its_tokenizer(bpe_run, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary = bpe_run
    tok = TextTokenizer.load(out / "tokenizer.json")
    assert tok.name == "bpe-48" and json.loads((out / "vocab.json").read_text())["tokens"] == tok.vocab
    dm = TextDataModule(corpus / "toytext.txt", batch_size=8, block_size=16, val_windows=16,
                        tokenizer_file=out / "tokenizer.json")
    per = dm.val_chars_per_token
    for k, loss in summary["val_loss"].items():
        assert summary["val_bpc"][k] == pytest.approx(loss / per / math.log(2))
    assert summary["corpus"]["name"] == "toytext" and summary["corpus"]["tokenizer"] == "bpe-48"
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/bpc/chunk1", "val/bpc/chunk2", "val/bits_per_token/chunk2"} <= tags
    last = acc.Scalars("val/bpc/chunk2")[-1].value
    assert last == pytest.approx(summary["val_bpc"]["chunk2"], rel=1e-5)
    from tensorboard.plugins.hparams import plugin_data_pb2

    session = EventAccumulator(str(out / "tb" / "hparams"))  # the HParams session, beside the curves
    session.Reload()
    content = session.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["data.corpus"].string_value == "toytext" and hparams["data.tokenizer"].string_value == "bpe-48"


def test_a_text_run_ends_with_its_bits_per_character(corpus, tmp_path, caplog):
    cfg = compose_config(tmp_path / "run", "data=text", f"data.path={corpus / 'toytext.txt'}", "trainer.max_steps=3")
    with caplog.at_level("INFO", logger="locallearn.runner"):
        summary = train(cfg)
    line = next(r.getMessage() for r in caplog.records if "bits per character" in r.getMessage())
    assert line == "final val bits per character: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["val_bpc"].items())


def test_a_continued_run_reads_its_saved_tokenizer(bpe_run, corpus, tmp_path):
    out, _ = bpe_run
    cfg = compose_config(tmp_path / "next", "data=text", f"data.path={corpus / 'toytext.txt'}", "data.tokenizer=bpe",
                         "data.vocab_size=48", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}")
    assert saved_tokenizer(cfg) == {"tokenizer_file": str(out / "tokenizer.json")}
    assert build(cfg).datamodule.tokenizer_file == str(out / "tokenizer.json")


def test_a_text_run_saved_before_tokenizers_reads_as_characters():
    old = {"data": {"_target_": "locallearn.data.TextDataModule", "path": "x.txt", "val_fraction": 0.1}}
    new = upgrade_config(old)["data"]
    assert new["tokenizer"] == "char" and new["vocab_size"] is None and new["val_path"] is None
    # labels that do not change the training never block a continuation
    assert differences({"data": {**new, "name": None}}, {"data": {**new, "name": "books", "test_path": "t"}}) == []


def test_run_directories_carry_the_corpus_name(corpus):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=text", f"data.path={corpus / 'toytext.txt'}"],
                      return_hydra_config=True)
        shakespeare = compose("config", overrides=["data=shakespeare"], return_hydra_config=True)
        task = compose("config", overrides=["data=induction"], return_hydra_config=True)
    name = lambda c: Path(OmegaConf.to_container(c.hydra.run, resolve=True)["dir"]).name  # noqa: E731
    assert "_toytext_" in name(cfg) and "_tinyshakespeare_" in name(shakespeare) and "_induction" not in name(task)


# -- evaluation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, T", [(2, 8), (9, 8), (10, 8), (100, 8), (101, 16), (7, 16)])
def test_evaluation_windows_score_every_target_once(n, T):
    starts, first = windows(n, T)
    width = min(T + 1, n)
    scored = [s + 1 + j for s, f in zip(starts, first) for j in range(f, width - 1)]
    assert sorted(scored) == list(range(1, n)) and (starts + width <= n).all()


def test_evaluate_gives_exact_bits_per_character_of_a_test_file(bpe_run, corpus):
    out, _ = bpe_run
    run = load_run(out, ckpt="best")
    ev = evaluate(run, "test", [f"data.test_path={corpus / 'test.txt'}"])
    text = (corpus / "test.txt").read_text(encoding="utf-8")
    tokens = run.tokenizer.encode(text)
    assert ev.tokens == len(tokens.ids) - 1 and ev.characters == len(text) - int(tokens.chars[0])
    for loss, bpc in zip(ev.loss, ev.bpc):
        assert bpc * ev.characters * math.log(2) == pytest.approx(loss * ev.tokens)
    # by hand: every target's -ln p with the context its window gives
    T = run.net.gpt.config.block_size
    ids = torch.from_numpy(tokens.ids)
    nll = 0.0
    with torch.no_grad():
        for s, f in zip(*windows(len(ids), T)):
            w = ids[s:s + T + 1]
            logits = list(run.net(w[None, :-1]))[-1][1][0]
            nll += float(torch.nn.functional.cross_entropy(logits[f:], w[1 + f:], reduction="sum"))
    assert ev.loss[-1] == pytest.approx(nll / ev.tokens, rel=1e-5)


def test_evaluate_cli_writes_a_table_beside_the_run(bpe_run, corpus, tmp_path, capsys):
    out, _ = bpe_run
    proc = subprocess.run([sys.executable, "analysis/evaluate.py", str(out), f"data.test_path={corpus / 'test.txt'}",
                           "--out", str(tmp_path / "ev")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "| bits per character |" in table and "bpe-48" in table and "test.txt" in table
    records = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert len(records) == 1 and len(records[0]["bpc"]) == 2
    assert records[0]["checkpoint"] == "best.ckpt" and records[0]["step"] in (6, 12)  # validated at steps 6 and 12
    # its errors, from the script's main in this process (a fresh interpreter costs seconds each)
    spec = importlib.util.spec_from_file_location("evaluate_script", PROJECT_ROOT / "analysis" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    assert script.main([str(out)]) == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} has no test split: pass one with data.test_path=FILE (a text file or folder), or pass "
        f"--split val."]
    code = script.main([str(out), "data.test_file=x.txt"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(
        f"error: data.test_file is not a setting of {out.name}'s data (it has _target_, batch_size,") and \
        "test_path" in lines[0], lines


# -- probes on any treebank, word-aligned -----------------------------------------------------------------

WORDS = {"DET": ["the", "a", "every"], "NOUN": ["cat", "dog", "bird", "farmer"], "VERB": ["sees", "likes", "chases"],
         "ADJ": ["old", "small", "happy"]}


def toy_sentences(n: int, seed: int):
    """(text, [(form, upos, deprel)]) sentences: DET (ADJ) NOUN VERB DET NOUN ."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [(rng.choice(WORDS["DET"]), "DET", "det")]
        if rng.random() < 0.5:
            words.append((rng.choice(WORDS["ADJ"]), "ADJ", "amod"))
        words += [(rng.choice(WORDS["NOUN"]), "NOUN", "nsubj"), (rng.choice(WORDS["VERB"]), "VERB", "root"),
                  (rng.choice(WORDS["DET"]), "DET", "det"), (rng.choice(WORDS["NOUN"]), "NOUN", "obj"),
                  (".", "PUNCT", "punct")]
        out.append((" ".join(f for f, _, _ in words[:-1]) + ".", words))
    return out


def toy_text(n: int, seed: int) -> str:
    return "".join(text + "\n" for text, _ in toy_sentences(n, seed))


def write_treebank(folder: Path, splits=("dev", "test"), n: int = 120) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(splits):
        lines = []
        for text, words in toy_sentences(n, seed=10 + i):
            lines.append(f"# text = {text}")
            for j, (form, upos, rel) in enumerate(words, 1):
                misc = "SpaceAfter=No" if j == len(words) - 1 else "_"
                lines.append(f"{j}\t{form}\t{form}\t{upos}\t_\t_\t0\t{rel}\t_\t{misc}")
            lines.append("")
        (folder / f"xx_toy-ud-{split}.conllu").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_treebank_files_are_found_by_split_name_and_train_is_optional(tmp_path):
    folder = write_treebank(tmp_path / "UD_Toy")
    files = treebank_files(folder)
    assert set(files) == {"dev", "test"} and treebank_name(folder) == "xx_toy" == treebank_name([files["test"]])
    assert set(treebank_files([str(files["dev"]), str(files["test"])])) == {"dev", "test"}
    task = ud_task("upos", folder, {"train": None, "dev": None, "test": None}, seed=0)
    assert "probe-train is a seeded 80% of xx_toy-ud-dev.conllu's sentences" in task.note
    assert task.treebank == "xx_toy"
    n_dev = sum(len(ws) for _, ws in toy_sentences(120, seed=10))
    assert len(task.splits["train"].labels) + len(task.splits["dev"].labels) == n_dev
    with pytest.raises(ConfigError, match=r"^treebank=.* has no test file .*; pass a UD treebank folder or its files"):
        treebank_files(write_treebank(tmp_path / "only_dev", splits=("dev",)))


def test_a_word_is_read_at_its_last_piece_or_as_the_mean_of_its_pieces():
    tok = TextTokenizer.train("bpe", [toy_text(50, 0)], vocab_size=40)
    text = "the farmer likes a cat.\n"
    spans = [(0, 2), (4, 9), (11, 15), (17, 17), (19, 21), (22, 22)]  # each word's first and last character
    data = Split(text, None, np.array([e for _, e in spans]), np.zeros(6, dtype=int), ["w"] * 6,
                 starts=np.array([s for s, _ in spans]))
    enc = tok.encode(text)
    piece_of = lambda c: int(np.flatnonzero((enc.starts <= c) & (c < enc.ends))[0])  # noqa: E731
    stream, positions, counts, unknown = word_pieces(tok, data, "last")
    assert counts is None and unknown == 0 and positions.tolist() == [piece_of(e) for _, e in spans]
    _, positions, counts, _ = word_pieces(tok, data, "mean")
    expect = [list(range(piece_of(s), piece_of(e) + 1)) for s, e in spans]
    assert counts.tolist() == [len(x) for x in expect] and positions.tolist() == sum(expect, [])


def test_probes_on_another_treebank_with_char_and_bpe_runs(corpus, tmp_path):
    treebank = write_treebank(tmp_path / "UD_Toy")
    runs = tmp_path / "runs"
    for i, (tok, chunks) in enumerate([("char", 1), ("char", 2), ("bpe", 1), ("bpe", 2)]):
        train(compose_config(runs / f"{i}_{tok}_chunks={chunks}", "data=text", f"data.path={corpus / 'toytext.txt'}",
                             f"data.tokenizer={tok}", f"chunks={chunks}", "trainer.max_steps=8",
                             *(["data.vocab_size=48"] if tok == "bpe" else [])))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("probing", overrides=[f"runs={runs}", f"treebank={treebank}", "word_pieces=mean",
                                            "baselines=false", f"cache_dir={tmp_path / 'cache'}", "cka_words=200"])
    out = tmp_path / "out"
    rows = probe_runs(cfg, out)
    assert {r["tokenizer"] for r in rows} == {"char", "bpe-48"} and {r["treebank"] for r in rows} == {"xx_toy"}
    assert {r["word_pieces"] for r in rows} == {"mean"}
    local = [r for r in rows if r["chunks"] == 2 and r["split"] == "test" and r["layer"] == "block1"]
    assert len(local) == 2 and all(r["cka_same_depth"] is not None for r in local)  # each against its own e2e
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Probes: upos on xx_toy") and "no train file: probe-train" in summary
    assert "Tokenizers: bpe-48, char" in summary and "K=2 chunked bpe-48" in summary
