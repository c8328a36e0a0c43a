"""A run's hyperparameters and final metrics as TensorBoard's HParams tab compares them.

Every run logs the same defining choices (the config groups it was built from, the chunk plan, lr, steps, seed),
so that runs of one sweep, or of several, line up in one table. The metrics are named per chunk
(``hparams/val_loss/chunk3``) and, for comparing runs of different K, for the last chunk (``.../last``).
"""

from omegaconf import OmegaConf

from locallearn.training.chunk_metrics import bits_per_character

# The config groups a run is built from (conf/<group>/): their chosen option names the column.
GROUPS = ("data", "model", "mode", "head", "objective", "method", "optim", "schedule", "trainer")
# Groups whose plain settings also become columns (model.n_layer, optim.lr, data.batch_size ...).
DETAILED = ("model", "data", "optim", "schedule", "head", "objective", "method")
ALIASED = ("optim.lr", "data.path")  # columns of their own above: lr, data.path


def _choices() -> dict:
    """Hydra's chosen option per group, where the run was composed by Hydra (run.py, compose(), tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def _plain(value):
    """A value TensorBoard can show: numbers, strings and booleans as they are, anything else as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(list(value) if OmegaConf.is_list(value) else value)


def run_hparams(config, module, trainer) -> dict:
    """The choices that define a run: ``{"data": "shakespeare", "data.path": ..., "chunks": 4, "plan": ...}``."""
    choices = _choices()
    plan = module.net.plan
    out = {group: choices.get(group) or _target_name(config.get(group)) for group in GROUPS}
    out["mode"], out["method"], out["objective"] = module.mode, module.method.name, module.objective.name
    data = config.get("data") or {}
    out["data.path"] = str(data.get("path") or "generated")  # the generated data sets have no files
    out |= {
        "chunks": len(plan),
        "plan": "|".join(f"{c.trained.start}-{c.trained.stop - 1}" for c in plan),  # blocks each loss trains: 0-1|2-3
        "lr": _plain((config.get("optim") or {}).get("lr")),
        "steps": trainer.max_steps,
        "seed": config.get("seed"),
        "overlap": config.get("overlap", 0), "interlock": config.get("interlock", 1),
        "switch.at": _plain((config.get("switch") or {}).get("at")),
        "loss_weights": _plain(config.get("loss_weights")), "grad_clip": _plain(config.get("grad_clip")),
    }
    for group in DETAILED:
        for key, value in (config.get(group) or {}).items():
            if not str(key).startswith("_") and not OmegaConf.is_dict(value) and f"{group}.{key}" not in ALIASED:
                out[f"{group}.{key}"] = _plain(value)
    corpus = getattr(trainer.datamodule, "provenance", None)
    if corpus:  # the corpus's name and the tokenizer as trained (bpe-1024), not only as asked
        out["data.corpus"], out["data.tokenizer"] = corpus["name"], corpus["tokenizer"]
    return {k: _plain(v) for k, v in out.items()}


def _target_name(node) -> str:
    target = (node or {}).get("_target_") if OmegaConf.is_dict(node) or isinstance(node, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else "null"


def final_metrics(module, chars_per_token: float | None) -> dict[str, float]:
    """The run's final validation numbers per chunk and for its last chunk (``hparams/...`` tags)."""
    per_chunk = {"val_loss": list(module.final_val)}
    if chars_per_token:  # a causal LM on text: bits per character compare tokenizers
        per_chunk["val_bpc"] = [bits_per_character(v, chars_per_token) for v in module.final_val]
    if module.final_answers:
        per_chunk["answer_acc"] = list(module.final_answers["acc"])
    metrics = {"hparams/best_val_loss": module.best_val}
    for name, values in per_chunk.items():
        metrics |= {f"hparams/{name}/chunk{k + 1}": v for k, v in enumerate(values)}
        metrics[f"hparams/{name}/last"] = values[-1]
    return metrics
