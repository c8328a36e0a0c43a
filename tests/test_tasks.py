"""Synthetic tasks: answers correct by construction, answer masks exact, answer metrics on those positions only."""

import json
from pathlib import Path

import pytest
import torch

from locallearn.data.tasks import FILL, IGNORE_LABEL, SEP, AssociativeRecall, Induction, KHop
from locallearn.errors import ConfigError
from locallearn.model.objectives import IGNORE, CausalLM, MaskedLM, Prepared, answer_scores
from locallearn.runner import build, train

# Task sizes that fit model=tiny's windows of 17 tokens.
TINY_TASKS = {
    "mqar": ["data=mqar", "data.block_size=16", "data.n_pairs=3", "data.n_queries=2", "data.n_keys=8",
             "data.n_values=8"],
    "induction": ["data=induction", "data.block_size=16", "data.n_symbols=20", "data.segment=4"],
    "khop": ["data=khop", "data.block_size=16", "data.n_chains=2", "data.n_nodes=12"],
}
SMALL = ["data.n_train=500", "data.batch_size=8", "data.val_windows=16"]


def solve_mqar(task: AssociativeRecall, seq: list[int]) -> dict[int, int]:
    """Position of every answer token -> the value the context pairs with the key just before it."""
    sep = seq.index(SEP)
    pairs = dict(zip(seq[0:sep:2], seq[1:sep:2]))
    return {i: pairs[seq[i - 1]] for i in range(sep + 2, len(seq)) if seq[i - 1] in pairs and i % 2 == 0}


def test_associative_recall_hand_solved():
    task = AssociativeRecall(17, n_pairs=3, n_queries=2, n_keys=4, n_values=5)
    ex = task.generate(200, seed=3)
    for seq, answer, pair_key, recall in zip(ex.tokens.tolist(), ex.answer, ex.labels["pair_key"],
                                             ex.labels["recall"]):
        # k v k v k v | q a q a, then filler
        assert seq[6] == SEP and seq[11:] == [FILL] * 6
        keys, values = seq[0:6:2], seq[1:6:2]
        assert len(set(keys)) == 3 and all(2 <= k < 6 for k in keys) and all(6 <= v < 11 for v in values)
        expected = solve_mqar(task, seq[:11])
        assert set(expected) == {8, 10} and answer.nonzero().flatten().tolist() == [8, 10]
        assert all(seq[i] == v for i, v in expected.items())
        # labels: each context value carries its key; each query key the value it recalls
        assert {i: k + 2 for i, k in enumerate(pair_key.tolist()) if k != IGNORE_LABEL} == {1: keys[0], 3: keys[1],
                                                                                             5: keys[2]}
        assert {i: v + 6 for i, v in enumerate(recall.tolist()) if v != IGNORE_LABEL} == {7: seq[8], 9: seq[10]}
    assert task.decode(ex.tokens[0]).startswith("k") and " | " in task.decode(ex.tokens[0])


def test_associative_recall_distractors_are_never_queried():
    ex = AssociativeRecall(17, n_pairs=5, n_queries=1, n_keys=8, n_values=8).generate(100, seed=0)
    assert ex.answer.sum(1).eq(1).all()  # one query per example, the other four pairs are distractors


def test_induction_hand_solved():
    S = 4
    task = Induction(17, n_symbols=20, segment=S)
    ex = task.generate(300, seed=1)
    starts = set()
    for seq, answer, prev, seen in zip(ex.tokens.tolist(), ex.answer, ex.labels["prev_token"],
                                       ex.labels["seen_before"]):
        # the second occurrence: the tokens seen before (all other symbols are distinct)
        repeat = [i for i, t in enumerate(seq) if t in seq[:i]]
        assert len(repeat) == S and repeat == list(range(repeat[0], repeat[0] + S)) and len(set(seq)) == 17 - S
        p2 = repeat[0]
        p1 = seq.index(seq[p2])
        assert p2 >= p1 + S and seq[p1:p1 + S] == seq[p2:p2 + S]
        starts.add(p2 - p1)
        # answers: the repeat after its first token; each is what followed the previous token the first time
        assert answer.nonzero().flatten().tolist() == list(range(p2 + 1, p2 + S))
        for i in range(p2 + 1, p2 + S):
            assert seq[i] == seq[seq.index(seq[i - 1]) + 1]
        assert prev.tolist() == [IGNORE_LABEL] + seq[:-1]
        assert seen.nonzero().flatten().tolist() == repeat
    assert len(starts) > 3  # the offset is random


def test_khop_hand_solved():
    task = KHop(21, hops=3, n_chains=2, n_nodes=12)
    ex = task.generate(200, seed=2)
    for seq, answer, *hops in zip(ex.tokens.tolist(), ex.answer, *(ex.labels[f"hop{j}"] for j in (1, 2, 3))):
        sep = seq.index(SEP)
        assert sep == 12 and seq[sep + 5:] == [FILL] * (21 - sep - 5)
        edges = dict(zip(seq[0:sep:2], seq[1:sep:2]))
        assert len(edges) == 6
        for q in (sep + 1, sep + 3):
            node = seq[q]
            for j in range(3):
                node = edges[node]
                assert hops[j][q] + 2 == node  # hop j+1 reached
            assert seq[q + 1] == node  # the answer: three hops from the queried node
        assert answer.nonzero().flatten().tolist() == [sep + 2, sep + 4]


def test_generation_is_deterministic_per_seed():
    for task in (AssociativeRecall(33), Induction(33, n_symbols=40, segment=8), KHop(33, n_chains=3)):
        a, b, c = task.generate(50, 7), task.generate(50, 7), task.generate(50, 8)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer, b.answer)
        assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("make, message", [
    (lambda: AssociativeRecall(17, n_pairs=8), "data.block_size+1=17"),
    (lambda: AssociativeRecall(65, n_pairs=4, n_queries=5), "data.n_queries=5"),
    (lambda: AssociativeRecall(65, n_pairs=9, n_keys=8), "data.n_pairs=9"),
    (lambda: Induction(65, n_symbols=10), "data.n_symbols=10"),
    (lambda: Induction(65, segment=1), "data.segment=1"),
    (lambda: KHop(65, hops=3, n_chains=5, n_nodes=16), "data.n_nodes=16"),
    (lambda: KHop(65, hops=0), "data.hops=0"),
])
def test_task_settings_that_cannot_work_are_refused(make, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        make()


def test_answer_flags_follow_each_objectives_targets():
    tokens = torch.arange(10).view(1, 10)
    answer = torch.zeros(1, 10, dtype=torch.bool)
    answer[0, [4, 7]] = True
    clm = CausalLM().prepare((tokens, answer))
    assert clm.targets[clm.answer].tolist() == [4, 7]  # clm's position t predicts token t+1
    mlm = MaskedLM(mask_prob=0.99)
    mlm.bind(10)
    prepared = mlm.prepare((tokens, answer), torch.Generator().manual_seed(0))
    assert torch.equal(prepared.answer, answer[:, :-1])  # mlm's position t predicts token t itself


def test_answer_scores_count_only_answers_that_are_targets():
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 0] = logits[0, 3, 0] = 5.0  # argmax 1, 2, 0, 0
    targets = torch.tensor([[1, 0, 0, IGNORE]])
    answer = torch.tensor([[True, True, False, True]])  # position 3 has no target: not scored
    loss, correct, count = answer_scores(logits, Prepared(torch.zeros(1, 4, dtype=torch.long), targets,
                                                          answer=answer))
    assert count == 2 and int(correct) == 1
    expected = torch.nn.functional.cross_entropy(logits[0, :2], targets[0, :2], reduction="sum")
    assert float(loss) == pytest.approx(float(expected))


@pytest.mark.parametrize("task", sorted(TINY_TASKS))
def test_task_training_reports_answer_metrics_per_chunk(make_cfg, task):
    cfg = make_cfg(*TINY_TASKS[task], *SMALL, "chunks=2")
    summary = train(cfg)
    assert set(summary["answer_acc"]) == set(summary["answer_loss"]) == {"chunk1", "chunk2"}
    assert all(0 <= a <= 1 for a in summary["answer_acc"].values())
    assert 0 < summary["chance"]["answer_acc"] < 1
    on_disk = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert on_disk["answer_acc"] == summary["answer_acc"] and on_disk["chance"] == summary["chance"]


def test_answer_metrics_are_the_accuracy_on_the_answer_tokens_of_the_validation_examples(make_cfg):
    run = build(make_cfg(*TINY_TASKS["mqar"], *SMALL, "chunks=2"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    val = run.datamodule.val_examples
    x, answer = val.tokens[:, :-1], val.answer[:, 1:]
    with torch.no_grad():
        for k, (_, logits) in enumerate(run.module.net.eval()(x)):
            correct = logits.argmax(-1)[answer] == val.tokens[:, 1:][answer]
            loss = torch.nn.functional.cross_entropy(logits[answer], val.tokens[:, 1:][answer])
            assert run.module.final_answers["acc"][k] == pytest.approx(float(correct.float().mean()), abs=1e-6)
            assert run.module.final_answers["loss"][k] == pytest.approx(float(loss), rel=1e-5)


def test_data_cost_benchmark_writes_its_table(tmp_path, capsys):
    from analysis.data_cost import main

    out = tmp_path / "cost.json"
    assert main(["--data", "induction", "--set", "model=tiny", "data.block_size=16", "data.n_train=500",
                 "--batches", "5", "--steps", "2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["data"] == "induction" and row["batch_shape"] == [32, 17] and row["batch_ms"] > 0
    assert row["share_pct"] == pytest.approx(100 * row["batch_ms"] / row["step_ms"])
    assert "| induction | (32, 17) |" in capsys.readouterr().out
