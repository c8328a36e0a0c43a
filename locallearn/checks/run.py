"""The run config's checks, once, before anything is read or built: each value in its range (the RUN table),
then the checks that need several values at once."""

import importlib.util
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from locallearn.checks.specs import check_config
from locallearn.checks.tables import RUN
from locallearn.config import instantiate
from locallearn.errors import ConfigError
from locallearn.model.plan import ChunkPlan
from locallearn.training.switch import Switch


def check_run(cfg: DictConfig) -> None:
    """Raise a one-sentence :class:`ConfigError` for the first value or combination of ``cfg`` that cannot run."""
    check_config(cfg, RUN)
    strategy = get_class(cfg.strategy._target_)
    if strategy.name != cfg.mode:
        raise ConfigError(f"mode={cfg.mode} is set as a plain value but the strategy is {strategy.name}'s; choose the "
                          f"mode as a config group: mode={cfg.mode} on the command line, or "
                          f"'override /mode: {cfg.mode}' in an experiment's defaults.")
    objective = instantiate(cfg.objective)
    model_cfg = instantiate(cfg.model, vocab_size=1)  # checks the shape settings before the data loads
    if model_cfg.causal != objective.causal:
        raise ConfigError(
            f"model.causal={model_cfg.causal} does not match objective={objective.name}, which needs "
            f"{'causal' if objective.causal else 'bidirectional'} attention; drop the model.causal override "
            f"(it follows the objective)."
        )
    plan = ChunkPlan.build(model_cfg.n_layer, cfg.chunks, cfg.boundaries, cfg.overlap, cfg.interlock)
    check_loss_weights(cfg.get("loss_weights"), len(plan))
    check_chunk_lr(cfg.optim.get("chunk_lr"), len(plan))
    check_hypergrad_lr(cfg.optim.get("hypergrad_lr"))
    Switch(**cfg.get("switch", {}))
    _check_method(cfg)
    _check_loss_slices(cfg, objective)
    if cfg.data.block_size < objective.min_block_size:
        raise ConfigError(f"objective={objective.name} needs data.block_size >= {objective.min_block_size} but got "
                          f"data.block_size={cfg.data.block_size}; raise it or use objective=mlm.")
    if cfg.data.block_size > model_cfg.block_size:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} exceeds model.block_size={model_cfg.block_size}; "
            f"the model has no position embedding past its block_size, so lower data.block_size."
        )
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; pass the path of a .ckpt file to resume from.")
    _check_schedule(cfg)
    _check_accelerator(cfg)
    _check_loggers(cfg)
    strategy.check(cfg)  # what the execution mode cannot run (mode=pipeline: overlap, the switch ...)
    ddp = cfg.trainer.get("strategy")
    if isinstance(ddp, str) and ddp.startswith("ddp"):
        raise ConfigError(f"trainer.strategy={ddp} wraps the model in DistributedDataParallel, which syncs "
                          f"gradients in every backward pass (mode=sequential runs one per chunk); use trainer=ddp, "
                          f"whose strategy syncs them once per step.")


def _check_method(cfg: DictConfig):
    method = cfg.get("method")
    if not method or not get_class(method._target_).sends:
        return
    name = get_class(method._target_).name
    for key, local in (("overlap", 0), ("interlock", 1)):
        if cfg.get(key, local) != local:
            raise ConfigError(f"method={name} sends gradients back across the cut, and {key}={cfg[key]} moves the "
                              f"cut into earlier chunks; use one of them: drop {key} or use method=local.")
    if cfg.get("switch", {}).get("at") is not None:
        raise ConfigError(f"method={name} sends gradients back across the cut, and switch.at={cfg.switch.at} removes "
                          f"the cut after the switch; use one of them: switch.at=null or method=local.")


# Lightning loggers whose class imports but whose package is not a dependency (the class fails when built).
LOGGER_PACKAGES = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow", "CometLogger": "comet_ml",
                   "NeptuneLogger": "neptune"}


def _check_loggers(cfg: DictConfig):
    for name, node in (cfg.get("logger") or {}).items():
        module, _, cls = str(node.get("_target_", "")).rpartition(".")
        package = LOGGER_PACKAGES.get(cls) or module.split(".")[0]
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logger={name} needs the {package} package, which is not installed; pip install "
                              f"{package} (docs/running.md, Loggers), or use logger=tensorboard or logger=csv.")


def _check_loss_slices(cfg: DictConfig, objective):
    slices = cfg.get("loss_slices") or 1
    if slices == 1:
        return
    if cfg.mode == "joint":
        raise ConfigError(f"loss_slices={slices} saves memory where chunks backpropagate one at a time, but mode=joint "
                          f"keeps every chunk's graph until one backward; use mode=sequential or drop loss_slices.")
    if not objective.position_wise:
        raise ConfigError(f"loss_slices={slices} scores the loss in slices of the sequence, which objective="
                          f"{objective.name} cannot (its span-boundary term reads across them); use loss_slices=1.")
    method = get_class(cfg.method._target_) if cfg.get("method") else None
    if method is not None and method.uses_output:
        raise ConfigError(f"loss_slices={slices} cannot slice method={method.name}'s term on the chunk's whole "
                          f"output; use loss_slices=1.")
    if slices > cfg.data.block_size:
        raise ConfigError(f"loss_slices={slices} exceeds data.block_size={cfg.data.block_size} (a slice holds one "
                          f"position at least); use at most {cfg.data.block_size}.")


def _check_accelerator(cfg: DictConfig):
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} asks for a GPU, but this torch ({torch.__version__}) "
                          f"sees none; use trainer=cpu, or the default trainer (accelerator=auto takes a GPU when "
                          f"there is one).")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps asks for Apple's GPU, but this torch sees none; use trainer=cpu.")


def _check_schedule(cfg: DictConfig):
    # Building the scheduler against a throwaway optimizer checks its settings now rather than at
    # the first training step.
    if cfg.get("schedule") is not None:
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        instantiate(cfg.schedule)(dummy, total_steps=cfg.trainer.max_steps)


def check_loss_weights(weights, K: int) -> list[float]:
    if weights is None:
        return [1.0] * K
    weights = [float(w) for w in weights]
    if len(weights) != K or any(w < 0 for w in weights) or not any(weights):
        raise ConfigError(f"loss_weights={weights} must hold {K} non-negative numbers (one per chunk), "
                          f"not all zero.")
    return weights


def check_chunk_lr(chunk_lr, K: int) -> list[float] | None:
    if chunk_lr is None:
        return None
    try:
        rates = [float(r) for r in chunk_lr]
    except (TypeError, ValueError):
        rates = []
    if len(rates) != K or not all(r > 0 for r in rates):
        raise ConfigError(f"optim.chunk_lr={list(chunk_lr) if rates else chunk_lr} must hold {K} positive learning "
                          f"rates (one per chunk), e.g. from analysis/lr_range_test.py, or be null for optim.lr.")
    return rates


def check_hypergrad_lr(beta) -> float | None:
    if beta is None:
        return None
    if not isinstance(beta, (int, float)) or beta <= 0:
        raise ConfigError(f"optim.hypergrad_lr={beta} must be a positive hypergradient step size (the paper uses "
                          f"about 1e-7 with Adam) or null to keep the schedule's learning rates.")
    return float(beta)
