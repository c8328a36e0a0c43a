"""Test loss and bits per character of trained runs: every chunk's head on a held-out split, from a checkpoint.

The split (``test`` by default: ``data.test_path``, EWT's test file; ``val`` the run's validation text) is read
with the run's own data config, plus any ``data.*`` overrides, and tokenized with the run's saved tokenizer. It is
cut into consecutive windows of the model's context T + 1 tokens, overlapping by one token, so that every token
after the first is predicted exactly once, with the context a window gives it (0 to T-1 earlier tokens, as in
training and validation); a last, shorter remainder is scored in a window that ends at the split's end. Then

    loss = sum of the targets' -ln p / targets        (nats per token)
    bpc  = sum of the targets' -ln p / (characters of the targets x ln 2)

exactly, a causal LM's code length of the text per character. Other objectives (masked LM, span) report their
loss on the split, masked as in validation, and no bits per character (their loss is not the text's likelihood).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from locallearn.config import instantiate
from locallearn.errors import ConfigError
from locallearn.model.objectives import IGNORE
from locallearn.probing.features import TrainedRun

SPLITS = ("test", "val")


@dataclass
class Evaluation:
    """One run's scores on one split: per chunk, nats per token and bits per character (None: not a causal LM)."""

    run: str
    checkpoint: str
    step: int
    split: str
    source: str  # the files of the split
    tokenizer: str
    tokens: int  # targets scored
    characters: int
    unknown: int  # characters (pieces, for word) outside the run's tokenizer, read by its rule
    loss: list[float]
    bpc: list[float] | None


def windows(n: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts of the (T+1)-token windows over a stream of ``n`` tokens, and per window the first target position
    (within the window's T targets) not scored by an earlier one: together they score targets 1..n-1 once."""
    if n < 2:
        raise ConfigError(f"the split has {n} token(s); at least 2 are needed to predict one.")
    width = min(T + 1, n)
    starts = list(range(0, n - width + 1, width - 1))
    first = [0] * len(starts)
    if starts[-1] + width < n:  # the remainder: a window ending at the end, scoring only what is new
        end = starts[-1] + width
        starts.append(n - width)
        first.append(end - (n - width) - 1)
    return np.array(starts), np.array(first)


def _split_data(run: TrainedRun, split: str, overrides: list[str]):
    """The run's data module with ``overrides`` (``data.*`` only), reading the run's tokenizer."""
    data = OmegaConf.create(OmegaConf.to_container(run.cfg.data, resolve=True))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("data."):
            raise ConfigError(f"{item} is not a data override; pass key=value with a data.* key, e.g. "
                              f"data.test_path=FILE.")
        if key[len("data."):] not in data:
            raise ConfigError(f"{key} is not a setting of {run.dir.name}'s data (it has {', '.join(sorted(data))}); "
                              f"override one of those.")
        OmegaConf.update(data, key[len("data."):], yaml.safe_load(value) if value else None, merge=False)
    if "tokenizer" not in data:
        raise ConfigError(f"{run.dir} was trained on generated data ({data.get('_target_')}), which has no test "
                          f"split; evaluate runs trained on text (data=text, shakespeare, ewt).")
    saved = run.dir / "tokenizer.json"
    with open_dict(data):
        data.tokenizer_file = str(saved) if saved.is_file() else None
    module = instantiate(data)
    if module.vocab != run.vocab:
        raise ConfigError(f"the data as overridden gives another vocabulary than {run.dir} trained with (its "
                          f"vocab.json); evaluate with the run's own data settings.")
    tokens = module.test_tokens if split == "test" else module.val_tokens
    if tokens is None:
        raise ConfigError(f"{run.dir} has no test split: pass one with data.test_path=FILE (a text file or folder), "
                          f"or pass --split val.")
    chars = module.test_chars if split == "test" else module.val_chars
    files = [str(p) for p in module.sources.get(split, [])]
    return tokens, chars, ", ".join(files), module.unknown.get(split, 0)


@torch.no_grad()
def evaluate(run: TrainedRun, split: str = "test", overrides=(), batch_size: int = 32) -> Evaluation:
    if split not in SPLITS:
        raise ConfigError(f"split={split} is not a split; use one of {', '.join(SPLITS)}.")
    tokens, chars, source, unknown = _split_data(run, split, list(overrides))
    objective = instantiate(run.cfg.objective)
    objective.bind(len(run.vocab))
    T = run.net.gpt.config.block_size
    starts, first = windows(len(tokens), T)
    width = min(T + 1, len(tokens))
    offsets = torch.arange(width)
    K = len(run.net.plan)
    nll, scored, n_chars = torch.zeros(K, dtype=torch.float64), 0, 0
    device = next(run.net.parameters()).device
    for b in range(0, len(starts), batch_size):
        s = torch.from_numpy(starts[b:b + batch_size])
        batch = tokens[s[:, None] + offsets]  # (B, T+1)
        generator = torch.Generator().manual_seed(998_244_353 + b)  # masks of mlm/span, fixed per batch
        prepared = objective.prepare(batch, generator)
        keep = torch.arange(width - 1)[None, :] >= torch.from_numpy(first[b:b + batch_size])[:, None]  # (B, T)
        targets = torch.where(keep, prepared.targets, torch.full_like(prepared.targets, IGNORE))
        prepared.targets = targets.to(device)
        prepared.idx = prepared.idx.to(device)
        mask = targets != IGNORE
        count = int(mask.sum())
        if not count:
            continue
        scored += count
        if objective.name == "clm":
            n_chars += int(chars[s[:, None] + offsets][:, 1:][mask].sum())
        for k, (h, logits) in enumerate(run.net(prepared.idx)):
            extra = run.net.extra[k] if run.net.extra is not None else None
            nll[k] += float(objective.loss(logits, h, prepared, extra)) * count
    if not scored:
        raise ConfigError(f"objective={objective.name} put no target in the {split} split's windows; evaluate a "
                          f"longer split.")
    loss = (nll / scored).tolist()
    bpc = (nll / n_chars / math.log(2)).tolist() if objective.name == "clm" else None
    tok = run.tokenizer.name if run.tokenizer else "?"
    return Evaluation(str(run.dir), run.ckpt.name if run.ckpt else "random init", run.step, split, source, tok,
                      scored, n_chars, unknown, loss, bpc)
