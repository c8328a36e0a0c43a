"""Probing: the CoNLL-U reader, word alignment, probes, CKA, feature extraction and a whole probe run."""

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from locallearn.chunked import ChunkedGPT
from locallearn.chunking import ChunkPlan
from locallearn.config import PROJECT_ROOT
from locallearn.data.conllu import read_conllu
from locallearn.errors import ConfigError
from locallearn.heads import BlockHead
from locallearn.model import GPT, GPTConfig
from locallearn.probing.cka import linear_cka, unbiased_cka
from locallearn.probing.features import _windows, encode_text, extract, states
from locallearn.probing.probes import LinearProbe, MLPProbe, run_probe
from locallearn.probing.report import probe_runs
from locallearn.train import train
from tests.conftest import CONF_DIR, SHARED_DATA

CONLLU = """\
# sent_id = 1
# text = I don't know, won't you?
1\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tknow\tknow\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
4.1\tknow\tknow\tVERB\tVB\t_\t_\t_\t4:conj\t_
5\t,\t,\tPUNCT\t,\t_\t4\tpunct\t_\t_
6-7\twon't\t_\t_\t_\t_\t_\t_\t_\t_
6\two\twill\tAUX\tMD\t_\t4\tparataxis\t_\t_
7\tn't\tnot\tPART\tRB\t_\t6\tadvmod\t_\t_
8\tyou\tyou\tPRON\tPRP\t_\t6\tnsubj:pass\t_\tSpaceAfter=No
9\t?\t?\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = 2
1\tGo\tgo\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
2\t!\t!\tPUNCT\t.\t_\t1\tpunct\t_\t_
"""


def test_conllu_reader_skips_multiword_tokens_and_empty_nodes(tmp_path):
    path = tmp_path / "toy.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    first, second = read_conllu(path)
    assert first.forms == ["I", "do", "n't", "know", ",", "wo", "n't", "you", "?"]
    assert first.upos == ["PRON", "AUX", "PART", "VERB", "PUNCT", "AUX", "PART", "PRON", "PUNCT"]
    assert first.deprel[-2] == "nsubj"  # coarse: the part before ':'
    assert second.text == "Go!"  # no "# text =" line: rebuilt from the forms and SpaceAfter=No
    assert second.forms == ["Go", "!"]


def test_each_word_is_placed_at_its_last_character(tmp_path):
    path = tmp_path / "toy.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    first, second = read_conllu(path)
    text = first.text
    # "do" ends at the "o" of "don't", "n't" at its "t"; likewise inside "won't".
    assert [text[: e + 1] for e in first.ends[:3]] == ["I", "I do", "I don't"]
    assert [text[e] for e in first.ends] == ["I", "o", "t", "w", ",", "o", "t", "u", "?"]
    assert second.ends == [1, 2]


@pytest.mark.parametrize("line, problem", [
    ("1\tI\tI\tPRON\tPRP\t_\t0\troot\t_", "expected 10 tab-separated columns, found 9"),
    ("x\tI\tI\tPRON\tPRP\t_\t0\troot\t_\t_", "malformed word id 'x'"),
    ("1\tI\tI\tPRONOUN\tPRP\t_\t0\troot\t_\t_", "unknown UPOS tag 'PRONOUN'"),
    ("1\tYou\tyou\tPRON\tPRP\t_\t0\troot\t_\t_", "word 'You' not found"),
])
def test_malformed_conllu_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.conllu"
    path.write_text(f"# text = I\n{line}\n\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_conllu(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}, line 2: ") and problem in msg and "\n" not in msg, msg


@pytest.mark.shared_data
def test_ewt_files_align_every_word():
    sents = read_conllu(SHARED_DATA / "ud-english-ewt" / "en_ewt-ud-dev.conllu")
    assert len(sents) == 2001 and sum(len(s.forms) for s in sents) == 25147
    assert all(s.text[e] == f[-1] for s in sents for f, e in zip(s.forms, s.ends))


def test_linear_probe_reads_a_planted_feature_and_not_random_labels():
    rng = np.random.default_rng(0)
    n, d, k = 1500, 20, 4
    labels = {s: rng.integers(0, k, n) for s in ("train", "dev", "test")}
    centers = rng.normal(size=(k, d)) * 4
    feats = {s: rng.normal(size=(n, d)) + centers[y] for s, y in labels.items()}  # separable by class
    random = {s: rng.integers(0, k, n) for s in labels}
    result = run_probe(LinearProbe(), feats, labels, control=random)
    assert result.accuracy > 0.99
    assert abs(result.control_accuracy - 1 / k) < 0.05  # chance: nothing to read
    assert result.selectivity > 0.7


def test_mlp_probe_reads_a_feature_no_linear_probe_can():
    rng = np.random.default_rng(0)
    feats = {s: rng.normal(size=(1500, 2)) for s in ("train", "dev", "test")}
    labels = {s: (f[:, 0] * f[:, 1] > 0).astype(int) for s, f in feats.items()}  # XOR of the signs
    assert run_probe(LinearProbe(), feats, labels).accuracy < 0.7
    assert run_probe(MLPProbe(hidden=32, alpha=(1e-4,), max_iter=300), feats, labels).accuracy > 0.85


def test_probe_option_selects_the_probe():
    assert isinstance(instantiate(probing_cfg("probe=mlp", "runs=x").probe), MLPProbe)
    assert isinstance(instantiate(probing_cfg("runs=x").probe), LinearProbe)


def test_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 32))
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    other = rng.normal(size=(500, 32))
    for cka in (linear_cka, unbiased_cka):
        assert cka(x, x) == pytest.approx(1.0)
        assert cka(x, x @ q) == pytest.approx(1.0)  # orthogonal transform
        assert cka(x, 7.5 * x) == pytest.approx(1.0)  # isotropic scaling
    assert linear_cka(x, other) < 0.1  # biased towards 1 at small N, still low
    assert abs(unbiased_cka(x, other)) < 0.02


def test_unknown_characters_are_read_as_spaces():
    ids, unknown = encode_text("ab\u00e9 c", ["a", "b", " ", "c"])
    assert ids.tolist() == [0, 1, 2, 2, 3] and unknown == 1
    ids, unknown = encode_text("x", ["a", "b"])  # no space in the vocabulary: token 0
    assert ids.tolist() == [0] and unknown == 1


@pytest.mark.parametrize("causal", [True, False])
def test_windows_give_every_position_context(causal):
    n, T = 203, 16
    starts, which = _windows(n, T, causal)
    pos = np.arange(n)
    off = pos - starts[which]
    assert ((off >= 0) & (off < T)).all() and (starts + T <= n).all()
    if causal:  # at least T/2 characters of left context, except near the stream's start
        assert (off[pos >= T // 2] >= T // 2).all()
    else:  # at least T/4 on both sides, except near the ends
        inner = (pos >= T // 4) & (pos < n - T // 4)
        assert ((off[inner] >= T // 4) & (off[inner] < T - T // 4)).all()


@pytest.mark.parametrize("causal", [True, False])
def test_extract_matches_a_direct_forward_of_each_window(causal):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=11, causal=causal)
    net = ChunkedGPT(GPT(cfg), ChunkPlan.build(3, 2), BlockHead).eval()
    stream = np.random.default_rng(0).integers(0, 11, 150)
    positions = np.array([0, 5, 17, 64, 99, 149])
    got = extract(net, stream, positions, batch_size=2)
    starts, which = _windows(len(stream), 16, causal)
    assert set(got) == {"embed", "block1", "block2", "block3", "head1", "head2"}
    for i, p in enumerate(positions):
        s = starts[which[p]]
        direct = states(net, torch.from_numpy(stream[s:s + 16])[None])
        for name, h in direct.items():
            torch.testing.assert_close(torch.from_numpy(got[name][i]), h[0, p - s], rtol=1e-5, atol=1e-5)
    # The head features are what the unembedding sees: the block head's output before its projection.
    direct = states(net, torch.from_numpy(stream[:16])[None])
    head = net.aux_heads[0]
    torch.testing.assert_close(direct["head1"], head.out.ln(head.block(direct["block2"])))
    torch.testing.assert_close(direct["head2"], net.gpt.ln_f(direct["block3"]))


# -- a whole probe run over two tiny trained runs ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_multirun(tmp_path_factory):
    """A multirun-shaped directory with an end-to-end and a chunks=2 run of the tiny synthetic config."""
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("multirun")
    for job, chunks in enumerate((1, 2)):
        train(compose_config(root / f"{job}_chunks={chunks}", f"chunks={chunks}", "trainer.max_steps=20",
                             "trainer.val_check_interval=10"))
    return root


def probing_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="probing", overrides=["task=category", "max_train_words=1500",
                                                         "max_eval_words=600", "cka_words=300", *overrides])


def test_probe_run_writes_csv_plots_and_summary(tiny_multirun, tmp_path):
    out = tmp_path / "out"
    rows = probe_runs(probing_cfg(f"runs={tiny_multirun}"), out)
    with (out / "probes.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    test = [r for r in table if r["split"] == "test"]
    models = {r["variant"] for r in test}
    assert models == {"end-to-end", "chunked", "random init"}
    # end-to-end: embed + 4 blocks + 1 head; chunks=2: + 2 heads; random init of the end-to-end config: 6
    assert sum(r["variant"] == "chunked" for r in test) == 7 and sum(r["variant"] == "end-to-end" for r in test) == 6
    for r in test:
        acc, ctrl, sel = float(r["accuracy"]), float(r["control_accuracy"]), float(r["selectivity"])
        assert 0 <= acc <= 1 and sel == pytest.approx(acc - ctrl)
    chunked = {r["layer"]: r for r in test if r["variant"] == "chunked"}
    assert chunked["block3"]["chunk"] == "2" and chunked["head1"]["depth"] == "2"
    assert float(chunked["block2"]["cka_same_depth"]) < 1.0
    assert all(float(r["cka_same_depth"]) == pytest.approx(1.0) for r in test
               if r["variant"] == "end-to-end" and not r["layer"].startswith("head"))
    # word categories are read far above the majority class (about 0.26 on this grammar)
    assert min(float(r["accuracy"]) for r in test) > 0.5
    for name in ("accuracy_vs_depth.png", "selectivity_vs_depth.png", "cka_K=2_chunked.png", "cka.csv",
                 "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "## K=2 chunked" in (out / "summary.md").read_text()
    assert any((out / "tb").iterdir())
    # the features are cached in each run and reused
    cache = list((tiny_multirun / "1_chunks=2" / "probe_features").glob("*.npz"))
    assert len(cache) == 3


def test_a_run_without_checkpoint_is_refused_before_any_work(tiny_multirun, tmp_path):
    run = tmp_path / "0_broken"
    shutil.copytree(tiny_multirun / "1_chunks=2", run, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(ConfigError, match=r"has no checkpoints/last.ckpt or best.ckpt"):
        probe_runs(probing_cfg(f"runs={run}", "cka=null"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cka_without_an_end_to_end_run_is_an_error(tiny_multirun, tmp_path):
    only_local = tmp_path / "multi"
    only_local.mkdir()
    shutil.copytree(tiny_multirun / "1_chunks=2", only_local / "0_chunks=2")
    with pytest.raises(ConfigError, match=r"holds no end-to-end run \(chunks=1\).*reference=.*cka=null"):
        probe_runs(probing_cfg(f"runs={only_local}"), tmp_path / "out")


def test_task_must_match_the_runs_data(tiny_multirun, tmp_path):
    with pytest.raises(ConfigError, match=r"task=upos reads UD EWT characters.*task=category"):
        probe_runs(probing_cfg(f"runs={tiny_multirun}", "task=upos"), tmp_path / "out")


def test_probe_cli_reports_one_line_error_for_a_directory_without_runs(tmp_path):
    empty = tmp_path / "chunks=1,4,data=x"  # a name that needs quoting in Hydra's grammar
    empty.mkdir()
    proc = subprocess.run([sys.executable, "analysis/probe.py", f"runs={empty}", f"paths.log_dir={tmp_path}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: runs={empty} holds no run"), lines[0]


@pytest.mark.shared_data
def test_a_run_lacking_characters_of_the_probe_data_follows_the_unknown_character_rule(tmp_path):
    from tests.conftest import compose_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 200, encoding="utf-8")  # no capitals, digits, ...
    run = tmp_path / "run"
    train(compose_config(run, "data=text", f"data.path={corpus}", "data.batch_size=4"))
    out = tmp_path / "out"
    rows = probe_runs(probing_cfg(f"runs={run}", "task=upos", "max_train_words=400", "max_eval_words=300",
                                  "cka=null", "baselines=false", f"ewt_path={SHARED_DATA / 'ud-english-ewt'}"), out)
    assert {r["task"] for r in rows} == {"upos"} and len(rows) == 2 * 7  # embed, 4 blocks, 2 heads; test + dev
    summary = (out / "summary.md").read_text()
    assert "characters outside this run's vocabulary were read as spaces" in summary


@pytest.mark.parametrize("overrides, expected", [
    (["chunks=1"], "end-to-end"),
    (["chunks=4"], "chunked"),
    (["chunking=greedy", "chunks=4"], "greedy"),
    (["chunks=4", "overlap=1", "head=block", "objective=span", "switch.at=0.8"],
     "chunked overlap=1 head=block objective=span switch.at=0.8"),
])
def test_variant_names(make_cfg, overrides, expected):
    from locallearn.probing.report import variant_of

    assert variant_of(make_cfg(*overrides)) == expected


def test_the_cka_reference_must_be_end_to_end(tiny_multirun, tmp_path):
    local = tiny_multirun / "1_chunks=2"
    with pytest.raises(ConfigError, match=r"reference=.* was trained with chunks=2; .* must be an end-to-end run"):
        probe_runs(probing_cfg(f"runs='{local}'", f"reference='{local}'"), tmp_path / "out")
