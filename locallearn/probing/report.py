"""The probe analysis of one run or a multirun: probes per layer, CKA against end-to-end, CSV, plots, summary.

:func:`probe_runs` takes the composed ``conf/probing.yaml`` config; ``analysis/probe.py`` is its command line.
Every input is checked (run directories, checkpoints, task against each run's data, the end-to-end
reference CKA needs) before any feature is extracted.
"""

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig

from locallearn.errors import ConfigError
from locallearn.probing.cka import CKA
from locallearn.probing.features import (
    TrainedRun,
    cached_features,
    encode_text,
    layer_chunk,
    layer_depth,
    layer_names,
    load_run,
)
from locallearn.probing.plots import plot_all
from locallearn.probing.probes import run_probe
from locallearn.probing.tasks import EWT_TASKS, SYNTHETIC_TASKS, ProbeTask, ewt_task, synthetic_task

log = logging.getLogger(__name__)

COLUMNS = ["run", "overrides", "chunks", "variant", "layer", "depth", "chunk", "task", "probe", "split", "accuracy",
           "control_accuracy", "selectivity", "cka_same_depth", "strength", "converged", "words"]


@dataclass
class Model:
    """A probed model: a trained run or the random-init baseline, with what the tables call it."""

    run: TrainedRun
    label: str  # "K=4 chunked", "end-to-end", "random init"
    overrides: str
    chunks: int
    variant: str


def find_runs(path) -> list[Path]:
    """A run directory itself, or the run directories inside a multirun directory (in job order)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"runs={path} is not a directory; pass a run or multirun directory.")
    if (path / "config.yaml").is_file():
        return [path]
    runs = sorted((p for p in path.iterdir() if (p / "config.yaml").is_file()), key=_job_order)
    if not runs:
        raise ConfigError(f"runs={path} holds no run (no config.yaml in it or its subdirectories); pass a run "
                          f"directory or a multirun directory.")
    return runs


def _job_order(p: Path):
    head = p.name.split("_", 1)[0]
    return (int(head), p.name) if head.isdigit() else (1 << 30, p.name)


def variant_of(cfg) -> str:
    """A short name for how a run trains: "end-to-end", or the local-learning settings that differ from the defaults."""
    if cfg.chunks == 1 and not cfg.get("overlap"):
        return "end-to-end"
    parts = ["greedy" if cfg.chunking.get("greedy") else "chunked"]
    if cfg.get("overlap"):
        parts.append(f"overlap={cfg.overlap}")
    head = str(cfg.head.get("_target_", "")).rsplit(".", 1)[-1].replace("Head", "").lower()
    if head and head != "linear":
        parts.append(f"head={head}")
    objective = instantiate(cfg.objective).name
    if objective != "clm":
        parts.append(f"objective={objective}")
    if cfg.get("switch") and cfg.switch.get("at") is not None:
        parts.append(f"switch.at={cfg.switch.at}")
    return " ".join(parts)


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    items = yaml.safe_load(path.read_text()) or []
    return " ".join(o for o in items if not o.startswith(("trainer.enable_progress_bar", "paths.")))


def _model(run: TrainedRun) -> Model:
    if run.ckpt is None:
        return Model(run, "random init", "", int(run.cfg.chunks), "random init")
    variant = variant_of(run.cfg)
    label = variant if variant == "end-to-end" else f"K={run.cfg.chunks} {variant}"
    return Model(run, label, _overrides(run.dir), int(run.cfg.chunks), variant)


def _data_name(run: TrainedRun) -> str:
    return str(run.cfg.data.get("_target_", "")).rsplit(".", 1)[-1]


def _check_task(cfg: DictConfig, runs: list[TrainedRun]) -> None:
    if cfg.task not in EWT_TASKS + SYNTHETIC_TASKS:
        raise ConfigError(f"task={cfg.task} is unknown; use one of {', '.join(EWT_TASKS + SYNTHETIC_TASKS)}.")
    for run in runs:
        synthetic = _data_name(run) == "SyntheticDataModule"
        if cfg.task in SYNTHETIC_TASKS and not synthetic:
            raise ConfigError(f"task={cfg.task} needs runs trained on data=synthetic, but {run.dir} was trained on "
                              f"{_data_name(run)}; use task=upos or task=deprel for character-level runs.")
        if cfg.task in EWT_TASKS and synthetic:
            raise ConfigError(f"task={cfg.task} reads UD EWT characters, but {run.dir} was trained on the synthetic "
                              f"language's words; use task=category or task=depth for it.")
    seeds = {int(r.cfg.data.corpus_seed) for r in runs if _data_name(r) == "SyntheticDataModule"}
    if len(seeds) > 1:
        raise ConfigError(f"the runs use different grammars (data.corpus_seed={sorted(seeds)}); probe runs of one "
                          f"grammar at a time.")


def _reference(cfg: DictConfig, runs: list[TrainedRun]) -> TrainedRun | None:
    if cfg.reference:
        ref = load_run(cfg.reference)
        if int(ref.cfg.chunks) != 1:
            raise ConfigError(f"reference={cfg.reference} was trained with chunks={ref.cfg.chunks}; the CKA reference "
                              f"must be an end-to-end run (chunks=1).")
        return ref
    e2e = [r for r in runs if int(r.cfg.chunks) == 1]
    if not e2e and cfg.cka:
        raise ConfigError(f"runs={cfg.runs} holds no end-to-end run (chunks=1) to compare against with CKA; pass "
                          f"reference=<an end-to-end run dir> or cka=null.")
    return e2e[0] if e2e else None


def _task(cfg: DictConfig, runs: list[TrainedRun]) -> ProbeTask:
    if cfg.task in EWT_TASKS:
        caps = {"train": cfg.max_train_words, "dev": cfg.max_eval_words, "test": cfg.max_eval_words}
        return ewt_task(cfg.task, cfg.ewt_path, caps, seed=cfg.seed)
    words = {"train": cfg.max_train_words or 20000, "dev": cfg.max_eval_words or 5000,
             "test": cfg.max_eval_words or 5000}
    return synthetic_task(cfg.task, int(runs[0].cfg.data.corpus_seed), words)


def _features(model: Model, task: ProbeTask, cfg: DictConfig) -> tuple[dict, int]:
    """{split: {layer: (N, C)}} for a model, and the number of unknown characters replaced."""
    feats, unknown = {}, 0
    for split, data in task.splits.items():
        if data.text is not None:
            stream, n_unknown = encode_text(data.text, model.run.vocab)
            unknown += n_unknown
        else:
            stream = data.tokens
        key = f"{task.source}_{split}"
        feats[split] = cached_features(model.run, key, stream, data.positions, batch_size=cfg.batch_size,
                                       device=cfg.device)
    return feats, unknown


def probe_runs(cfg: DictConfig, out_dir) -> list[dict]:
    """Probe every run of ``cfg.runs`` (and the baselines), write the outputs into ``out_dir``, return the CSV rows."""
    out_dir = Path(out_dir)
    run_dirs = find_runs(cfg.runs)
    runs = [load_run(d, device=cfg.device) for d in run_dirs]  # fails now on a missing checkpoint
    _check_task(cfg, runs)
    ref = _reference(cfg, runs)
    if cfg.cka and cfg.cka not in CKA:
        raise ConfigError(f"cka={cfg.cka} is unknown; use one of {', '.join(CKA)}, or null to skip CKA.")
    probe = instantiate(cfg.probe)
    task = _task(cfg, runs)
    log.info("task %s: %s words in probe-train / dev / test", task.name,
             " / ".join(f"{len(s.labels):,}" for s in task.splits.values()))

    models = [_model(r) for r in runs]
    if ref is not None and all(r.dir != ref.dir for r in runs):
        models.insert(0, _model(ref))
    if cfg.baselines:
        base = ref or runs[0]
        models.append(_model(load_run(base.dir, random_init=True, device=cfg.device)))
    seen: dict[str, int] = {}
    for model in models:
        seen[model.label] = seen.get(model.label, 0) + 1
    for model in models:  # runs that differ only in seed: tell them apart by directory
        if seen[model.label] > 1:
            model.label += f" [{model.run.dir.name}]"
    labels = {s: d.labels for s, d in task.splits.items()}
    control = task.control_labels(cfg.seed) if cfg.control else None

    rows, feats_of, unknown_of, cka_of = [], {}, {}, {}
    for model in models:
        feats_of[model.label], unknown_of[model.label] = _features(model, task, cfg)
    ref_label = next((m.label for m in models if ref is not None and m.run.dir == ref.dir and m.run.ckpt), None)
    for model in models:
        feats = feats_of[model.label]
        if ref_label is not None and cfg.cka:
            cka_of[model.label] = _cka_matrix(feats["test"], feats_of[ref_label]["test"], cfg)
        for layer in layer_names(model.run.net):
            result = run_probe(probe, {s: f[layer] for s, f in feats.items()}, labels, control, seed=cfg.seed)
            depth = layer_depth(model.run.net, layer)
            same = None  # heads have no counterpart in the end-to-end model's trunk
            if model.label in cka_of and not layer.startswith("head"):
                same = cka_of[model.label][1].get((layer, _ref_layer(depth)))
            base = dict(run=model.run.name, overrides=model.overrides, chunks=model.chunks, variant=model.variant,
                        layer=layer, depth=depth, chunk=layer_chunk(model.run.net, layer), task=task.name,
                        probe=type(probe).__name__, strength=result.strength, converged=result.converged)
            rows.append(base | dict(split="test", accuracy=result.accuracy, control_accuracy=result.control_accuracy,
                                    selectivity=result.selectivity, cka_same_depth=same,
                                    words=len(labels["test"])))
            rows.append(base | dict(split="dev", accuracy=result.dev_accuracy, words=len(labels["dev"])))
            log.info("%-22s %-7s acc %.3f  control %s  selectivity %s", model.label, layer, result.accuracy,
                     _fmt(result.control_accuracy), _fmt(result.selectivity))

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "probes.csv", rows, COLUMNS)
    cka_rows = [dict(run=label, layer=a, reference_layer=b, cka=v) for label, (_, m) in cka_of.items()
                for (a, b), v in m.items()]
    if cka_rows:
        _write_csv(out_dir / "cka.csv", cka_rows, ["run", "layer", "reference_layer", "cka"])
    figures = plot_all(rows, models, cka_of, ref_label, task.name, out_dir)
    summary = _summary(cfg, task, models, rows, unknown_of, ref_label, figures)
    (out_dir / "summary.md").write_text(summary, encoding="utf-8")
    _tensorboard(out_dir / "tb", figures, summary)
    return rows


def _ref_layer(depth: int) -> str:
    return "embed" if depth == 0 else f"block{depth}"


def _cka_matrix(x: dict, y: dict, cfg: DictConfig):
    """CKA of every layer of ``x`` against every layer of ``y`` on the first ``cka_words`` test words."""
    fn, n = CKA[cfg.cka], cfg.cka_words
    rows, cols = list(x), list(y)
    m = {(a, b): fn(x[a][:n], y[b][:n]) for a in rows for b in cols}
    return (rows, cols), m


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def _summary(cfg, task: ProbeTask, models: list[Model], rows, unknown_of, ref_label, figures) -> str:
    test = task.splits["test"].labels
    majority = np.bincount(test, minlength=len(task.classes)).max() / len(test)
    lines = [f"# Probes: {task.name} ({len(task.classes)} classes)", "",
             f"Runs: `{cfg.runs}`. Probe: `{type(instantiate(cfg.probe)).__name__}` "
             f"({', '.join(f'{k}={v}' for k, v in asdict(instantiate(cfg.probe)).items())}), selected on probe-dev, "
             f"reported on probe-test ({len(task.splits['test'].labels):,} words; majority class "
             f"{majority:.3f}). Selectivity = accuracy - control-task accuracy (Hewitt & Liang 2019)."
             + (f" CKA ({cfg.cka}) against `{ref_label}` at the same depth, on {cfg.cka_words} test words."
                if ref_label and cfg.cka else ""), ""]
    for model in models:
        sub = [r for r in rows if r["run"] == model.run.name and r["split"] == "test"]
        lines += [f"## {model.label}: `{model.run.dir}`" + (f" ({model.overrides})" if model.overrides else ""), "",
                  "| layer | depth | chunk | accuracy | control | selectivity | CKA vs e2e |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in sub:
            flag = "" if r["converged"] else " *"
            lines.append(f"| {r['layer']} | {r['depth']} | {r['chunk']} | {r['accuracy']:.3f}{flag} | "
                         f"{_fmt(r['control_accuracy'])} | {_fmt(r['selectivity'])} | {_fmt(r['cka_same_depth'])} |")
        if unknown_of.get(model.label):
            lines.append(f"\n{unknown_of[model.label]:,} characters outside this run's vocabulary were read as spaces.")
        lines.append("")
    if any(not r["converged"] for r in rows):
        lines.append("\\* the probe hit its iteration limit (raise `probe.max_iter`).\n")
    lines += ["Figures: " + ", ".join(f"`{p.name}`" for p in figures.values()), ""]
    return "\n".join(lines)


def _tensorboard(tb_dir: Path, figures: dict, summary: str) -> None:
    import matplotlib.image as mpimg
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb_dir)) as writer:
        for tag, path in figures.items():
            img = mpimg.imread(path)[..., :3]
            writer.add_image(f"probes/{tag}", img, dataformats="HWC")
        writer.add_text("probes/summary", summary)
