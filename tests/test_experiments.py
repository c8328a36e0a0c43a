"""Experiment recipes and named variants compose into the runs they promise."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from locallearn.runner import build
from tests.conftest import CONF_DIR


def compose_with_hydra(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_chunk_sweep_is_chunks_by_seeds_on_shakespeare():
    cfg = compose_with_hydra("experiment=chunk_sweep")
    assert cfg.hydra.sweeper.params == {"chunks": "1,2,4,8", "seed": "0,1,2"}
    assert cfg.data.path.endswith("tinyshakespeare/input.txt")
    assert cfg.model.n_embd == 128 and cfg.model.n_layer == 8  # deep enough for chunks=8


def test_variants_sweep_every_variant_at_the_same_budget():
    cfg = compose_with_hydra("experiment=variants")
    variants = cfg.hydra.sweeper.params.variant.split(",")
    assert variants == ["end_to_end", "chunked", "greedy", "overlap", "block_head", "switch"]
    assert cfg.hydra.sweeper.params.seed == "0,1,2" and cfg.trainer.max_steps == 2000


def test_shakespeare_char_is_the_reference_recipe():
    cfg = compose_with_hydra("experiment=shakespeare_char")
    assert cfg.chunks == 1 and cfg.data.batch_size == 12 and cfg.trainer.max_steps == 2000
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert cfg.optim.lr == 1e-3 and cfg.schedule._target_.endswith("warmup_cosine")


@pytest.mark.parametrize("variant, chunks, trained", [
    ("end_to_end", 1, [[0, 1, 2, 3]]),
    ("chunked", 4, [[0], [1], [2], [3]]),
    ("greedy", 4, [[0], [1], [2], [3]]),
    ("overlap", 4, [[0], [0, 1], [1, 2], [2, 3]]),
    ("block_head", 4, [[0], [1], [2], [3]]),
    ("switch", 4, [[0], [1], [2], [3]]),
    ("chunks2", 2, [[0, 1], [2, 3]]),
    ("shallow2", 1, [[0, 1]]),
    ("shallow1", 1, [[0]]),
])
def test_each_variant_builds(make_cfg, variant, chunks, trained):
    run = build(make_cfg(f"variant={variant}"))
    plan = run.module.net.plan
    assert len(plan) == chunks and [list(c.trained) for c in plan] == trained
    if variant == "block_head":
        assert type(run.module.net.aux_heads[0]).__name__ == "BlockHead"
    if variant == "switch":
        assert run.module.switch.at == 0.8


DEPTH_BENEFIT = {"induction": ("InductionDataModule", 64), "shakespeare": ("TextDataModule", 128)}


@pytest.mark.parametrize("recipe", sorted(DEPTH_BENEFIT))
@pytest.mark.parametrize("variant, chunks, n_layer", [
    ("end_to_end", 1, 4), ("shallow2", 1, 2), ("shallow1", 1, 1), ("chunks2", 2, 4), ("chunked", 4, 4),
    ("overlap", 4, 4), ("block_head", 4, 4), ("switch", 4, 4), ("interlock2", 4, 4), ("synthetic", 4, 4),
    ("delayed", 4, 4),
])
def test_depth_benefit_variants_win_over_the_experiments_base(recipe, variant, chunks, n_layer):
    # variant comes after experiment in the defaults: the shallow references keep their depth under the recipe
    cfg = compose_with_hydra(f"experiment=depth_benefit/{recipe}", f"variant={variant}")
    assert (cfg.chunks, cfg.model.n_layer) == (chunks, n_layer)
    method = {"synthetic": "SyntheticGradients", "delayed": "DelayedGradients"}.get(variant, "Local")
    assert cfg.method._target_.endswith(method) and cfg.interlock == (2 if variant == "interlock2" else 1)
    data, width = DEPTH_BENEFIT[recipe]
    assert cfg.data._target_.endswith(data) and cfg.model.n_embd == width


@pytest.mark.parametrize("recipe", sorted(DEPTH_BENEFIT))
def test_depth_benefit_recipe_sweeps_both_references_every_variant_and_three_seeds(recipe):
    params = compose_with_hydra(f"experiment=depth_benefit/{recipe}").hydra.sweeper.params
    assert params.variant.split(",") == ["end_to_end", "shallow2", "shallow1", "chunks2", "chunked", "overlap",
                                         "block_head", "switch", "interlock2", "synthetic", "delayed"]
    assert params.seed == "0,1,2"


def test_the_default_run_trains_four_one_block_chunks_on_a_task_with_answers():
    # README "Quick start": python run.py ends with answer accuracy at depths 1 to 4
    cfg = compose_with_hydra()
    assert cfg.data._target_.endswith("InductionDataModule") and cfg.chunks == 4 and cfg.model.n_layer == 4
    assert cfg.data.block_size <= cfg.model.block_size
