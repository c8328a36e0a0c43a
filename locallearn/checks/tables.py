"""The checked range of every option in ``conf/``: one spec per key (:mod:`locallearn.checks.specs`).

The rule: every numeric option has a range (and says whether it must be whole and whether null is allowed),
every option with a fixed set of values names them, every flag is a boolean, and every path is checked for
existence and kind. tests/test_checks.py walks every option file of ``conf/``, requires a spec here for every
key it finds, and feeds every spec its own bad values.
"""

from locallearn.checks.specs import Choice, Devices, Existing, Flag, Free, Number, Numbers, Spec
from locallearn.config import CONF_DIR

MODES = tuple(sorted(p.stem for p in (CONF_DIR / "mode").glob("*.yaml")))  # execution modes: their strategies
PROB = Number(0, 1)
SEED = Number(0, 2**32 - 1, integer=True, hint="a seed is a whole number such as 0")
POS_INT = Number(1, integer=True)
DERIVED = Free("derived from paths.output_dir")

# The run config (conf/config.yaml and its groups); run.py, tests and analysis/lr_range_test.py compose it.
RUN: dict[str, Spec] = {
    # top level
    "chunks": Number(1, integer=True, null=True, hint="chunks=1 is end-to-end backprop; null takes the count from "
                     "boundaries"),
    "boundaries": Numbers(Number(integer=True), null=True, hint="boundaries are block indices, e.g. "
                          "boundaries=[1,3] (the chunk plan checks their range)"),
    "overlap": Number(0, integer=True, hint="it counts blocks before a chunk, e.g. overlap=1"),
    "interlock": Number(1, integer=True, hint="it counts chunks a loss trains, its own included: 1 is local"),
    "mode": Choice(MODES, hint="each is a file of conf/mode/ (choose it as a group: mode=<name>)"),
    "strategy.threads": Free("interpolates pipeline.threads"),
    "strategy.backend": Free("interpolates pipeline.backend"),
    # the LightningModule's arguments interpolate the keys checked here (grad_clip, loss_weights, seed, optim.*)
    **{f"learner.{k}": Free(f"interpolates {v}") for k, v in (
        ("grad_clip", "grad_clip"), ("loss_weights", "loss_weights"), ("seed", "seed"),
        ("chunk_lr", "optim.chunk_lr"), ("hypergrad_lr", "optim.hypergrad_lr"))},
    "method.weight": Number(0, hint="it weighs the gradient sent back against the chunk's own loss; 0 sends none"),
    "method.predictor.hidden": Number(0, integer=True, hint="0 makes the predictor one linear map"),
    "method.predictor.attention": Flag(),
    "seed": SEED,
    "compile": Flag(),
    "loss_slices": Number(1, integer=True, hint="1 scores the whole sequence at once; 4 to 16 cut the heads' share "
                          "of activation memory"),
    "grad_clip": Number(0, lo_open=True, null=True, hint="it is the max gradient norm per chunk (of the whole model "
                        "in global steps); null disables clipping"),
    "loss_weights": Numbers(Number(0), null=True, hint="one weight per chunk, e.g. loss_weights=[0.5,1]"),
    "switch.at": Number(0, 1, lo_open=True, null=True, hint="a fraction of trainer.max_steps; null stays local"),
    "switch.aux_weight": Number(0),
    "switch.ewc_lambda": Number(0, hint="0 turns EWC off"),
    "switch.fisher": Choice((True, "true", "empirical"), hint="true samples the targets from the model (the Fisher "
                            "information), empirical takes the data's"),
    "switch.fisher_batches": POS_INT,
    "ckpt_path": Existing("file", hint="pass the path of a .ckpt file, e.g. <run dir>/checkpoints/last.ckpt"),
    "resume": Existing("dir", hint="pass the directory of the run to continue"),
    "pipeline.threads": Number(1, integer=True, null=True, hint="null shares the cores among the chunks"),
    "pipeline.backend": Choice(("gloo", "nccl")),
    "process.threads": Number(1, integer=True, null=True, hint="null: OMP_NUM_THREADS if set, else the process's "
                              "share of its cores"),
    "process.release_memory": Flag(),
    # objective (before model: model.causal follows objective.causal)
    "objective.causal": Flag(),
    "objective.mask_prob": Number(0, 1, lo_open=True, hi_open=True),
    "objective.geometric_p": Number(0, 1, lo_open=True),
    "objective.max_span": POS_INT,
    # model
    "model.n_layer": POS_INT, "model.n_head": POS_INT, "model.n_embd": POS_INT, "model.block_size": POS_INT,
    "model.dropout": Number(0, 1, hi_open=True),
    "model.bias": Flag(),
    "model.causal": Flag(),
    "model.pos": Choice(("learned", "rope")),
    # data
    "data.batch_size": POS_INT, "data.block_size": POS_INT, "data.val_windows": POS_INT,
    "data.seed": SEED, "data.val_seed": SEED, "data.corpus_seed": SEED,
    "data.n_train_tokens": POS_INT, "data.n_val_tokens": POS_INT,
    "data.val_fraction": Number(0, 1, lo_open=True, hi_open=True),
    "data.path": Free("checked by the data set itself: a text file or folder (data=text) or the EWT folder (data=ewt)"),
    "data.val_path": Free("checked by the data set itself: a text file or folder"),
    "data.test_path": Free("checked by the data set itself: a text file or folder"),
    "data.tokenizer_file": Free("checked where it is read: a tokenizer.json a run saved"),
    "data.name": Free("a label: the corpus's name in directory names, summaries and hparams"),
    "data.tokenizer": Choice(("char", "bpe", "word")),
    "data.vocab_size": Number(2, integer=True, null=True, hint="null: bpe 1024, word 8192; bpe needs at least the "
                              "corpus's distinct characters"),
    # tasks (data=mqar|induction|khop); how their sizes fit one window is checked by the task itself
    "data.task_seed": SEED, "data.n_train": POS_INT,
    "data.n_pairs": POS_INT, "data.n_queries": POS_INT, "data.n_keys": POS_INT, "data.n_values": POS_INT,
    "data.n_symbols": POS_INT, "data.segment": Number(2, integer=True, hint="the first token of a repeat is no "
                                                       "answer, so a segment needs two"),
    "data.hops": POS_INT, "data.n_chains": POS_INT, "data.n_nodes": POS_INT,
    # optimizer and schedule
    "optim.lr": Number(0, lo_open=True, hint="it is a learning rate, e.g. optim.lr=1e-3"),
    "optim.betas": Numbers(Number(0, 1, hi_open=True), length=2, hint="e.g. optim.betas=[0.9,0.99]"),
    "optim.weight_decay": Number(0),
    "optim.chunk_lr": Numbers(Number(0, lo_open=True), null=True, hint="one learning rate per chunk"),
    "optim.hypergrad_lr": Number(0, lo_open=True, null=True, hint="a hypergradient step size (the paper uses about "
                                 "1e-7 with Adam), or null to keep the schedule's learning rates"),
    "schedule.warmup_steps": Number(0, integer=True, null=True, hint="null: the fraction schedule.warmup of the run"),
    "schedule.warmup": Number(0, 1, hi_open=True),
    "schedule.min_lr_ratio": PROB,
    "schedule.mode": Choice(("triangular", "triangular2", "exp_range")),
    "schedule.cycle_steps": Number(2, integer=True, hint="a cycle rises for half its steps and falls for the other "
                                   "half"),
    "schedule.base_lr_ratio": Number(0, 1, lo_open=True, hi_open=True, hint="the cycle's lowest LR as a fraction "
                                     "of its peak"),
    "schedule.gamma": Number(0, 1, lo_open=True, hint="mode=exp_range shrinks the amplitude as gamma^step"),
    "schedule.cycle_momentum": Flag(),
    "schedule.base_momentum": Number(0, 1, hi_open=True),
    "schedule.max_momentum": Number(0, 1, hi_open=True),
    "schedule.pct_start": Number(0, 1, lo_open=True, hi_open=True, hint="the fraction of the run the LR rises"),
    "schedule.div_factor": Number(1, lo_open=True, hint="the first LR is lr / div_factor"),
    "schedule.final_div_factor": Number(1, hint="the last LR is lr / (div_factor x final_div_factor)"),
    "schedule.anneal_strategy": Choice(("cos", "linear")),
    "schedule.three_phase": Flag(),
    # trainer
    "trainer.max_steps": Number(1, integer=True, hint="the run's length in steps, e.g. trainer.max_steps=2000"),
    "trainer.val_check_interval": Number(1, integer=True, hint="validate every N steps (and at the last)"),
    "trainer.check_val_every_n_epoch": Choice((None,), hint="the training stream is endless: count steps with "
                                              "trainer.val_check_interval"),
    "trainer.log_every_n_steps": POS_INT,
    "trainer.num_sanity_val_steps": Number(-1, integer=True),
    "trainer.enable_progress_bar": Flag(), "trainer.enable_model_summary": Flag(),
    "trainer.enable_autolog_hparams": Flag(),
    "trainer.accelerator": Choice(("auto", "cpu", "gpu", "cuda", "mps", "tpu")),
    "trainer.devices": Devices(),
    "trainer.num_nodes": POS_INT,
    "trainer.precision": Choice(("32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "16-true",
                                 "bf16-true", "64-true", "64", 64)),
    "trainer.strategy.start_method": Choice(("popen", "spawn", "fork", "forkserver")),
    "trainer.default_root_dir": DERIVED,
    "trainer.plugins": Free("the atomic checkpoint writer; replace only with another CheckpointIO"),
    # callbacks and logger
    "callbacks.model_checkpoint.dirpath": DERIVED,
    "callbacks.model_checkpoint.filename": Free("a file-name pattern"),
    "callbacks.model_checkpoint.monitor": Free("a metric name such as val/loss"),
    "callbacks.model_checkpoint.mode": Choice(("min", "max")),
    "callbacks.model_checkpoint.save_top_k": Number(-1, integer=True),
    "callbacks.model_checkpoint.save_last": Flag(),
    "callbacks.model_checkpoint.auto_insert_metric_name": Flag(),
    "callbacks.diagnostics.path": DERIVED,
    "callbacks.diagnostics.stop_on_divergence": Flag(),
    "callbacks.diagnostics.fit_curves": Flag(),
    "callbacks.diagnostics.predict_step": Number(1, integer=True, null=True, hint="null = 10 x trainer.max_steps"),
    "callbacks.diagnostics.diverge_ratio": Number(1, lo_open=True),
    "callbacks.diagnostics.diverge_window": POS_INT,
    "callbacks.diagnostics.spike_z": Number(0, lo_open=True),
    "callbacks.diagnostics.spike_window": Number(10, integer=True),
    "callbacks.diagnostics.plateau_evals": Number(2, integer=True),
    "callbacks.diagnostics.plateau_rel": Number(0, 1, lo_open=True, hi_open=True),
    "callbacks.diagnostics.underfit_margin": Number(0, 1, hi_open=True),
    "callbacks.diagnostics.rise_window": Number(2, integer=True),
    "callbacks.diagnostics.rise_rel": Number(0, lo_open=True),
    "callbacks.summary.path": DERIVED,
    "logger.tensorboard.save_dir": DERIVED,
    "logger.tensorboard.name": Free("a folder name"),
    "logger.tensorboard.version": Free("a folder name"),
    "logger.tensorboard.default_hp_metric": Flag(),
    "logger.csv.save_dir": DERIVED, "logger.csv.name": Free("a folder name"),
    "logger.csv.version": Free("a folder name"), "logger.csv.flush_logs_every_n_steps": POS_INT,
    # loggers that are not dependencies: their settings are theirs to check (a missing package is refused first)
    "logger.wandb.save_dir": DERIVED, "logger.wandb.project": Free("a W&B project"),
    "logger.wandb.name": Free("a W&B run name"), "logger.wandb.group": Free("a W&B group"),
    "logger.wandb.log_model": Free("false, true or all (W&B's log_model)"),
    "logger.mlflow.experiment_name": Free("an MLflow experiment"), "logger.mlflow.run_name": Free("an MLflow run name"),
    "logger.mlflow.tracking_uri": Free("an MLflow tracking URI"), "logger.mlflow.log_model": Free("MLflow's log_model"),
    "logger.aim.repo": Free("an Aim repository"), "logger.aim.experiment": Free("an Aim experiment"),
    "callbacks.progress_bar.refresh_rate": POS_INT,
    # paths
    "paths.root_dir": Free("the directory the command runs in"),
    "paths.data_dir": Free("checked where it is read, through data.path or treebank"),
    "paths.log_dir": Free("checked by the run-directory callback: it must be writable"),
    "paths.output_dir": Free("set by Hydra"),
}


_PATHS = {"paths.root_dir": RUN["paths.root_dir"], "paths.data_dir": RUN["paths.data_dir"],
          "paths.log_dir": RUN["paths.log_dir"], "paths.output_dir": RUN["paths.output_dir"]}

# analysis/probe.py (conf/probing.yaml and conf/probe/)
PROBING: dict[str, Spec] = {
    "runs": Existing("dir", null=False, hint="pass a run directory or a multirun directory"),
    "task": Choice(("upos", "deprel", "agreement", "role", "depth", "category",  # corpora; then the tasks' labels
                    "prev_token", "seen_before", "pair_key", "recall", *(f"hop{j}" for j in range(1, 10))),
                   hint="; whether it fits the runs' data is checked when they are read"),
    "control": Flag(), "baselines": Flag(),
    "cka": Choice(("unbiased", "linear", None), hint="null skips CKA"),
    "reference": Existing("dir", hint="pass an end-to-end run directory, or null for each run's same-seed one"),
    "cka_words": Number(4, integer=True), "cka_permutations": POS_INT,
    "treebank": Free("checked for its dev and test .conllu files when a UD task reads it"),
    "word_pieces": Choice(("last", "mean")),
    "max_train_words": Number(1, integer=True, null=True), "max_eval_words": Number(1, integer=True, null=True),
    "batch_size": POS_INT,
    "device": Free("a torch device such as cpu or cuda:0"),
    "seed": SEED,
    "cache_dir": Free("checked to lie outside every probed run"),
    "probe.C": Numbers(Number(0, lo_open=True), hint="the inverse L2 strengths probe-dev chooses from"),
    "probe.alpha": Numbers(Number(0, lo_open=True), hint="the L2 strengths probe-dev chooses from"),
    "probe.max_iter": POS_INT, "probe.hidden": POS_INT,
    "probe.tol": Number(0, lo_open=True, hint="the largest gradient entry at which the linear probe stops"),
    **_PATHS,
}

# analysis/lr_range_test.py: its lr_range block (the rest is the run config, checked by RUN)
LR_RANGE: dict[str, Spec] = {
    "lr_range.lr_min": Number(0, lo_open=True), "lr_range.lr_max": Number(0, lo_open=True),
    "lr_range.steps": Number(12, integer=True, hint="100 to 300 is usual"),
    "lr_range.smooth": Number(0, 1, hi_open=True, null=True, hint="the EMA factor; null takes a window of 5% of "
                              "the sweep"),
    "lr_range.diverge": Number(1, lo_open=True, hint="a multiple of the lowest smoothed loss"),
    "lr_range.suggest": Choice(("min_loss", "steepest")),
    "lr_range.device": Free("a torch device such as cpu or cuda"),
}
