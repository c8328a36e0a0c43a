import pytest

from locallearn.model.plan import ChunkPlan


def layers(plan):
    return [list(c.layers) for c in plan]


@pytest.mark.parametrize(
    ("n_layer", "k", "expected"),
    [
        (4, 1, [[0, 1, 2, 3]]),
        (4, 2, [[0, 1], [2, 3]]),
        (4, 4, [[0], [1], [2], [3]]),
        (5, 2, [[0, 1, 2], [3, 4]]),  # earlier chunks take the extra layer
        (7, 3, [[0, 1, 2], [3, 4], [5, 6]]),
        (8, 3, [[0, 1, 2], [3, 4, 5], [6, 7]]),
    ],
)
def test_balanced_split(n_layer, k, expected):
    plan = ChunkPlan.build(n_layer, k)
    assert layers(plan) == expected
    assert [c.name for c in plan] == [f"chunk{i + 1}" for i in range(k)]


def test_explicit_boundaries():
    plan = ChunkPlan.build(6, None, [1, 4])
    assert layers(plan) == [[0], [1, 2, 3], [4, 5]]
    assert plan.boundaries == [1, 4]
    assert ChunkPlan.build(6, 3, [1, 4]) == plan  # a matching chunks= is accepted


def test_describe_names_the_embedding_and_blocks():
    assert ChunkPlan.build(4, 2).describe() == "chunk1: embedding + blocks 0-1\nchunk2: blocks 2-3"
