"""The probe analysis of one run or a multirun: probes per layer, CKA against the same-seed end-to-end run,
CSV, plots, summary.

:func:`probe_runs` takes the composed ``conf/probing.yaml`` config; ``analysis/probe.py`` is its command line.
Every input is checked (options, run directories, checkpoints, the task against the data of every run and of
the reference, the reference of every run CKA needs, output paths outside every run) before any feature is
extracted. Results go to ``out_dir`` and hidden states to ``cache_dir``: no run directory is written.
"""

import csv
import logging
from dataclasses import asdict
from pathlib import Path
from statistics import mean, stdev

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from locallearn.atomic import atomic_open, write_text
from locallearn.checks import PROBING, check_config
from locallearn.probing.cka import cka_matrix
from locallearn.probing.features import (
    cached_features,
    layer_chunk,
    layer_depth,
    layer_names,
    load_run,
    word_pieces,
)
from locallearn.probing.plots import plot_all
from locallearn.probing.runs import (
    Model,
    check_outside_runs,
    check_reference,
    check_task,
    find_runs,
    make_model,
    pair_references,
    run_task,
    seed_groups,
    unique_labels,
)
from locallearn.probing.tasks import UD_TASKS, ProbeTask, synthetic_task, task_probe, ud_task

log = logging.getLogger(__name__)

COLUMNS = ["run", "label", "overrides", "seed", "chunks", "variant", "tokenizer", "treebank", "word_pieces", "layer",
           "depth", "chunk", "task", "lexical",
           "probe", "split", "accuracy", "control_accuracy", "selectivity", "cka_same_depth", "cka_null", "reference",
           "strength", "converged", "words"]
CKA_COLUMNS = ["run", "reference", "layer", "reference_layer", "cka", "cka_null"]


def _task(cfg: DictConfig, runs) -> ProbeTask:
    if cfg.task in UD_TASKS:
        caps = {"train": cfg.max_train_words, "dev": cfg.max_eval_words, "test": cfg.max_eval_words}
        return ud_task(cfg.task, cfg.treebank, caps, seed=cfg.seed)
    words = {"train": cfg.max_train_words or 20000, "dev": cfg.max_eval_words or 5000,
             "test": cfg.max_eval_words or 5000}
    task = run_task(runs[0])
    if task is not None:
        return task_probe(cfg.task, task, int(runs[0].cfg.data.task_seed), words)
    return synthetic_task(cfg.task, int(runs[0].cfg.data.corpus_seed), words)


def _features(model: Model, task: ProbeTask, cfg: DictConfig) -> tuple[dict, int]:
    """{split: {layer: (N, C)}} for a model, and the number of unknown characters (pieces, for word) it met."""
    feats, unknown = {}, 0
    for split, data in task.splits.items():
        counts = None
        if data.text is not None:
            stream, positions, counts, n_unknown = word_pieces(model.run.tokenizer, data, cfg.word_pieces)
            unknown += n_unknown
        else:
            stream, positions = data.tokens, data.positions
        got = cached_features(model.run, f"{task.source}_{split}", stream, positions, cfg.cache_dir,
                              batch_size=cfg.batch_size, device=cfg.device, example_len=data.example_len)
        if counts is not None:  # the mean over each word's pieces
            bounds = np.concatenate([[0], np.cumsum(counts)[:-1]])
            got = {k: np.add.reduceat(v, bounds, axis=0) / counts[:, None].astype(np.float32) for k, v in got.items()}
        feats[split] = got
    return feats, unknown


def _models(cfg: DictConfig, out_dir: Path) -> list[Model]:
    """The probed models, each with its CKA reference: every check that needs no features happens here."""
    check_config(cfg, PROBING)  # every option in its range before any run is read
    runs = [load_run(d, device=cfg.device) for d in find_runs(cfg.runs)]  # fails now on a missing checkpoint
    forced = load_run(cfg.reference, device=cfg.device) if cfg.reference else None
    loaded = runs + ([forced] if forced else [])
    check_task(cfg.task, loaded)
    if forced is not None:
        check_reference(cfg, forced, runs)
    check_outside_runs({"hydra.run.dir": out_dir, "cache_dir": Path(cfg.cache_dir)}, loaded)
    models = [make_model(r) for r in runs]
    ref = None
    if forced is not None:
        ref = next((m for m in models if m.run.dir.resolve() == forced.dir.resolve()), None)
        if ref is None:
            ref = make_model(forced)
            models.insert(0, ref)
    if cfg.baselines:  # a random init of every end-to-end run's config (the seed's weights before training)
        bases = [m.run for m in models if m.trained and m.chunks == 1] or runs[:1]
        models += [make_model(load_run(b.dir, random_init=True, device=cfg.device)) for b in bases]
    if cfg.cka:
        pair_references(models, ref, cfg.runs)
    if len({_tokenizer(m) for m in models}) > 1:  # runs of several tokenizers: say which is which
        for m in models:
            m.label += f" {_tokenizer(m)}"
    unique_labels(models)
    return models


def probe_runs(cfg: DictConfig, out_dir) -> list[dict]:
    """Probe every run of ``cfg.runs`` (and the baselines), write the outputs into ``out_dir``, return the CSV rows."""
    out_dir = Path(out_dir)
    models = _models(cfg, out_dir)
    probe = instantiate(cfg.probe)
    task = _task(cfg, [m.run for m in models])
    log.info("task %s%s: %s words in probe-train / dev / test%s", task.name,
             f" on {task.treebank}" if task.treebank else "",
             " / ".join(f"{len(s.labels):,}" for s in task.splits.values()), f" ({task.note})" if task.note else "")
    labels = {s: d.labels for s, d in task.splits.items()}
    control = task.control_labels(cfg.seed) if cfg.control else None

    feats_of, unknown_of, cka_of = {}, {}, {}
    for model in models:
        feats_of[model.label], unknown_of[model.label] = _features(model, task, cfg)
    for model in models:
        if model.reference is not None:
            first = {k: v[:cfg.cka_words] for k, v in feats_of[model.label]["test"].items()}
            ref = {k: v[:cfg.cka_words] for k, v in feats_of[model.reference.label]["test"].items()}
            cka_of[model.label] = cka_matrix(first, ref, cfg.cka, cfg.cka_permutations, seed=cfg.seed)

    rows = []
    for model in models:
        feats = feats_of[model.label]
        names = layer_names(model.run.net)
        fitted = probe.fit_layers({s: {n: f[n] for n in names} for s, f in feats.items()}, labels, control,
                                  seed=cfg.seed)
        for layer in names:
            result = fitted[layer]
            depth = layer_depth(model.run.net, layer)
            same = null = None  # heads have no counterpart in the end-to-end model's trunk
            if model.label in cka_of and not layer.startswith("head"):
                values, nulls = cka_of[model.label]
                same, null = values.get((layer, _ref_layer(depth))), nulls.get((layer, _ref_layer(depth)))
            base = dict(run=model.run.name, label=model.label, overrides=model.overrides, seed=model.seed,
                        chunks=model.chunks, variant=model.variant, tokenizer=_tokenizer(model),
                        treebank=task.treebank, word_pieces=cfg.word_pieces if task.treebank else None,
                        layer=layer, depth=depth,
                        chunk=layer_chunk(model.run.net, layer), task=task.name, lexical=task.lexical,
                        probe=type(probe).__name__, reference=model.reference and model.reference.label,
                        strength=result.strength, converged=result.converged)
            rows.append(base | dict(split="test", accuracy=result.accuracy, control_accuracy=result.control_accuracy,
                                    selectivity=result.selectivity, cka_same_depth=same, cka_null=null,
                                    words=len(labels["test"])))
            rows.append(base | dict(split="dev", accuracy=result.dev_accuracy, words=len(labels["dev"])))
            log.info("%-22s %-7s acc %.3f  control %s  selectivity %s  CKA %s", model.label, layer, result.accuracy,
                     _fmt(result.control_accuracy), _fmt(result.selectivity), _cka_text(same, null))

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "probes.csv", rows, COLUMNS)
    refs = {m.label: m.reference.label for m in models if m.reference is not None}
    cka_rows = [dict(run=label, reference=refs[label], layer=a, reference_layer=b, cka=v, cka_null=nulls[a, b])
                for label, (values, nulls) in cka_of.items() for (a, b), v in values.items()]
    if cka_rows:
        _write_csv(out_dir / "cka.csv", cka_rows, CKA_COLUMNS)
    figures = plot_all(rows, models, cka_of, task.name + (f" on {task.treebank}" if task.treebank else ""), out_dir)
    summary = _summary(cfg, task, models, rows, unknown_of, figures)
    write_text(out_dir / "summary.md", summary)
    _tensorboard(out_dir / "tb", figures, summary)
    return rows


def _ref_layer(depth: int) -> str:
    return "embed" if depth == 0 else f"block{depth}"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}".replace("-0.000", "0.000")


def _cka_text(value, null) -> str:
    return "-" if value is None else f"{_fmt(value)} (null {_fmt(null)})"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def _summary(cfg, task: ProbeTask, models: list[Model], rows, unknown_of, figures) -> str:
    test = task.splits["test"].labels
    majority = np.bincount(test, minlength=len(task.classes)).max() / len(test)
    ambiguous, types = task.ambiguous_types()
    probe = instantiate(cfg.probe)
    on = f" on {task.treebank}" if task.treebank else ""
    lexical = " - lexical control" if task.lexical else ""
    lines = [f"# Probes: {task.name}{on} ({len(task.classes)} classes){lexical}",
             "", *_text_lines(cfg, task, models), f"Runs: `{cfg.runs}`. Probe: `{type(probe).__name__}` "
             f"({', '.join(f'{k}={v}' for k, v in asdict(probe).items())}), selected on probe-dev, reported on "
             f"probe-test ({len(test):,} words; majority class {majority:.3f}). Selectivity = accuracy - control-task "
             f"accuracy (Hewitt & Liang 2019).", ""]
    if cfg.cka:
        lines += [f"CKA ({cfg.cka} HSIC estimator) of each layer against the same depth of its reference (the "
                  f"end-to-end run of the same seed and settings, or `reference=`), on the first {cfg.cka_words} "
                  f"test words; in parentheses its null: the same two feature sets with the words' pairing "
                  f"shuffled (mean of {cfg.cka_permutations} seeded permutations).", ""]
    lines.append(f"{ambiguous} of {types} word types of probe-train carry more than one label."
                 + (f" `{task.name}` is a function of the word type: a lexical control, which measures the "
                    f"embedding and not what training learned about structure." if task.lexical else ""))
    lines.append("")
    for model in models:
        lines += [f"## {model.label}: `{model.run.dir}`" + (f" ({model.overrides})" if model.overrides else ""), ""]
        if model.reference is not None and model.reference is not model:
            lines += [f"CKA reference: {model.reference.label}.", ""]
        lines += ["| layer | depth | chunk | accuracy | control | selectivity | CKA vs e2e (null) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in rows if r["label"] == model.label and r["split"] == "test"):
            flag = "" if r["converged"] else " *"
            lines.append(f"| {r['layer']} | {r['depth']} | {r['chunk']} | {r['accuracy']:.3f}{flag} | "
                         f"{_fmt(r['control_accuracy'])} | {_fmt(r['selectivity'])} | "
                         f"{_cka_text(r['cka_same_depth'], r['cka_null'])} |")
        if unknown_of.get(model.label):
            kind = model.run.tokenizer.kind
            lines.append(f"\n{unknown_of[model.label]:,} " + ("pieces outside this run's vocabulary were read as <unk>."
                         if kind == "word" else f"characters outside this run's alphabet were read as "
                         f"{model.run.tokenizer.fallback!r} (locallearn/data/tokenizer.py)."))
        lines.append("")
    lines += _seed_tables(models, rows)
    if any(not r["converged"] for r in rows):
        lines.append("\\* the probe hit its iteration limit (raise `probe.max_iter`).\n")
    lines += ["Figures: " + ", ".join(f"`{p.name}`" for p in figures.values()), ""]
    return "\n".join(lines)


def _tokenizer(model: Model) -> str | None:
    return model.run.tokenizer.name if model.run.tokenizer is not None else None


def _text_lines(cfg, task: ProbeTask, models: list[Model]) -> list[str]:
    """What a treebank task read: the files, how its splits were made, the tokenizers and the word rule."""
    if task.treebank is None:
        return []
    tokenizers = sorted({_tokenizer(m) for m in models})
    rule = {"last": "its last piece (for characters, its last character)", "mean": "the mean over its pieces"}
    lines = [f"Treebank: {task.treebank} (`{cfg.treebank}`)" + (f"; {task.note}" if task.note else "") + ". "
             f"Tokenizers: {', '.join(tokenizers)}; a word's feature is {rule[cfg.word_pieces]} in each run's "
             f"tokens (`word_pieces={cfg.word_pieces}`).", ""]
    return lines


def _pm(values: list) -> str:
    """mean ± std over seeds (sample std), or - where a value is missing."""
    if not values or any(v is None for v in values):
        return "-"
    return f"{_fmt(mean(values))} ± {stdev(values):.3f}"


def _seed_tables(models: list[Model], rows) -> list[str]:
    """Per group of runs that differ only in their seed: per layer, mean ± std over the seeds."""
    lines = []
    for group in seed_groups(models):
        name = group[0].label.split(" [")[0]
        settings = " ".join(o for o in group[0].overrides.split() if not o.startswith("seed="))
        seeds = ", ".join(str(m.seed) for m in group)
        lines += [f"## {name} over seeds {seeds}" + (f" ({settings})" if settings else ""), "",
                  f"Mean ± std over {len(group)} seeds; runs: " + ", ".join(f"`{m.run.dir.name}`" for m in group)
                  + ".", "", "| layer | depth | chunk | accuracy | selectivity | CKA vs e2e (null) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        test = {(r["label"], r["layer"]): r for r in rows if r["split"] == "test"}
        for layer in layer_names(group[0].run.net):
            per = [test[m.label, layer] for m in group]
            cka = _pm([r["cka_same_depth"] for r in per])
            null = _pm([r["cka_null"] for r in per])
            lines.append(f"| {layer} | {per[0]['depth']} | {per[0]['chunk']} | {_pm([r['accuracy'] for r in per])} | "
                         f"{_pm([r['selectivity'] for r in per])} | {cka if cka == '-' else f'{cka} (null {null})'} |")
        lines.append("")
    return lines


def _tensorboard(tb_dir: Path, figures: dict, summary: str) -> None:
    import matplotlib.image as mpimg
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb_dir)) as writer:
        for tag, path in figures.items():
            img = mpimg.imread(path)[..., :3]
            writer.add_image(f"probes/{tag}", img, dataformats="HWC")
        writer.add_text("probes/summary", summary)
