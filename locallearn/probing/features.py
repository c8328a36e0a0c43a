"""Representations of a finished run: hidden states at every depth and each chunk's head features.

Layers, by name: ``embed`` (depth 0, token + position embedding), ``block{i}`` (after block i) and
``head{k}`` (what chunk k's head feeds its unembedding: after its norm, MLP or block). They are read
at the words' positions only, in eval mode without gradients, and cached in the probe tool's own
``cache_dir`` (never in the run directory, which only its run writes) so that further probes of the
same words reuse them.

Context: the stream is cut into windows of the model's ``block_size`` T, overlapping by half. A causal
model reads each position from the window where it lies in the second half (at least T/2 characters of
context; the first window serves its own first half); a bidirectional model from the window where it
lies in the middle half.

Text is read in the run's own tokens (locallearn/data/tokenizer.py, which also says how characters outside a
run's alphabet are read); report.py maps each word onto its pieces.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from locallearn.atomic import atomic_open
from locallearn.config import instantiate, load_saved
from locallearn.data.tokenizer import TextTokenizer
from locallearn.errors import ConfigError
from locallearn.model.chunked import ChunkedGPT, make_net


@dataclass
class TrainedRun:
    """A run directory, read back: its config, vocabulary and model."""

    dir: Path
    cfg: DictConfig
    vocab: list[str]
    net: ChunkedGPT
    ckpt: Path | None  # None: the randomly initialized baseline
    tokenizer: TextTokenizer | None = None  # text runs: the run's tokenizer.json (older runs: characters)
    step: int = 0  # the checkpoint's global step (0: random init)

    @property
    def name(self) -> str:
        return self.dir.name + ("" if self.ckpt else " (random init)")


def load_run(run_dir, random_init: bool = False, device: str = "cpu", ckpt: str = "last") -> TrainedRun:
    """Rebuild a run's model from ``config.yaml`` and ``vocab.json`` and load its checkpoint (``ckpt``: ``last.ckpt``
    or ``best.ckpt``, else the other); ``random_init`` instead keeps the freshly initialized weights of the run's
    seed."""
    run_dir = Path(run_dir)
    cfg_path, vocab_path = run_dir / "config.yaml", run_dir / "vocab.json"
    if not cfg_path.is_file() or not vocab_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml and vocab.json); pass the directory "
                          f"of a finished run (or a multirun holding runs).")
    if ckpt not in ("last", "best"):
        raise ConfigError(f"ckpt={ckpt} is not a checkpoint name; use last or best.")
    order = (f"{ckpt}.ckpt", "best.ckpt" if ckpt == "last" else "last.ckpt")
    ckpt = next((p for p in (run_dir / "checkpoints" / n for n in order) if p.is_file()), None)
    if ckpt is None and not random_init:
        raise ConfigError(f"{run_dir} has no checkpoints/last.ckpt or best.ckpt, so there is no trained model to "
                          f"probe; finish or resume the run first.")
    cfg = load_saved(cfg_path)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))["tokens"]
    torch.manual_seed(cfg.seed)
    net = make_net(cfg, instantiate(cfg.objective), len(vocab))
    step = 0
    if not random_init:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict({k[len("net."):]: v for k, v in saved["state_dict"].items() if k.startswith("net.")})
        step = int(saved.get("global_step", 0))
    net.eval().to(device)
    return TrainedRun(run_dir, cfg, vocab, net, None if random_init else ckpt, run_tokenizer(run_dir, cfg, vocab), step)


def run_tokenizer(run_dir: Path, cfg: DictConfig, vocab: list[str]) -> TextTokenizer | None:
    """A text run's tokenizer: its ``tokenizer.json``, or (runs from before tokenizers) characters by ``vocab.json``;
    None for generated data (its tokens are not text)."""
    if (run_dir / "tokenizer.json").is_file():
        return TextTokenizer.load(run_dir / "tokenizer.json")
    if "tokenizer" in cfg.data:
        return TextTokenizer.from_vocab(vocab)
    return None


def layer_names(net: ChunkedGPT) -> list[str]:
    return ["embed"] + [f"block{i + 1}" for i in range(net.gpt.config.n_layer)] + \
        [f"head{k + 1}" for k in range(len(net.plan))]


def layer_depth(net: ChunkedGPT, name: str) -> int:
    """Blocks below a layer: 0 for ``embed``, i for ``block{i}``, the chunk's last block for ``head{k}``."""
    if name == "embed":
        return 0
    if name.startswith("block"):
        return int(name[5:])
    return net.plan[int(name[4:]) - 1].layers[-1] + 1


def layer_chunk(net: ChunkedGPT, name: str) -> int:
    """The chunk (from 1) that trains a layer."""
    if name.startswith("head"):
        return int(name[4:])
    depth = max(layer_depth(net, name), 1)
    return next(k + 1 for k, c in enumerate(net.plan) if depth - 1 in c.layers)


def _unembedding(module: torch.nn.Module, vocab_size: int) -> torch.nn.Linear:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.out_features == vocab_size][-1]


@torch.no_grad()
def states(net: ChunkedGPT, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, T) token ids -> {layer name: (B, T, C)}. Forward values are those of training: the gradient
    cuts and the overlap's recomputation change gradients only."""
    gpt = net.gpt
    h = gpt.embed(idx)
    out = {"embed": h}
    for i, block in enumerate(gpt.blocks):
        h = block(h)
        out[f"block{i + 1}"] = h
    for k, chunk in enumerate(net.plan):
        grabbed = {}
        unembed = _unembedding(gpt if k == len(net.plan) - 1 else net.aux_heads[k], gpt.config.vocab_size)
        hook = unembed.register_forward_pre_hook(lambda _m, args, g=grabbed: g.setdefault("x", args[0]))
        try:
            net.head(k, out[f"block{chunk.layers[-1] + 1}"])
        finally:
            hook.remove()
        out[f"head{k + 1}"] = grabbed["x"]
    return out


def word_pieces(tokenizer, data, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """A text split in a run's tokens: (token stream, the positions to read, per word the number of positions it
    averages or None, unknown characters or pieces). A word's pieces are the tokens that hold its first through its
    last character; ``last`` reads the last one, ``mean`` averages them all."""
    enc = tokenizer.encode(data.text)
    token_of = lambda chars: np.searchsorted(enc.starts, chars, side="right") - 1  # noqa: E731
    last = token_of(data.positions)
    if rule == "last":
        return enc.ids, last, None, enc.unknown
    first = token_of(data.starts)
    counts = last - first + 1
    positions = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    return enc.ids, positions, counts, enc.unknown


def _windows(n: int, T: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Window starts (every window full, the last one ending at the stream's end), and for each stream
    position the index of the window it is read from."""
    S = max(T // 2, 1)
    starts = np.unique(np.minimum(np.arange(0, max(n - T, 0) + S, S), max(n - T, 0)))
    pos = np.arange(n)
    # causal: the last S positions of a window (the first window also serves [0, T - S));
    # bidirectional: the middle half [T/4, 3T/4); both partition the stream.
    which = (pos - (T - S)) // S if causal else (pos - T // 4) // S
    return starts, np.clip(which, 0, len(starts) - 1)


@torch.no_grad()
def extract(net: ChunkedGPT, stream: np.ndarray, positions: np.ndarray, batch_size: int = 64,
            device: str = "cpu", example_len: int | None = None) -> dict[str, np.ndarray]:
    """Token stream (n,) and word positions (N,) -> {layer name: (N, C) float32}. With ``example_len`` the
    stream is independent examples of that many tokens, each read as its own window (a task's examples)."""
    T, causal = net.gpt.config.block_size, net.gpt.config.causal
    if example_len is not None:
        starts, which = np.arange(0, len(stream), example_len), np.arange(len(stream)) // example_len
        width = example_len
    else:
        starts, which = _windows(len(stream), T, causal)
        width = min(T, len(stream))
    win = which[positions]  # (N,) the window each word is read from
    needed = np.unique(win)
    out: dict[str, np.ndarray] = {}
    for b in range(0, len(needed), batch_size):
        batch = needed[b:b + batch_size]
        idx = np.stack([stream[starts[w]:starts[w] + width] for w in batch])  # (B, T)
        got = states(net, torch.from_numpy(idx).to(device))
        sel = np.flatnonzero(np.isin(win, batch))
        row = torch.from_numpy(np.searchsorted(batch, win[sel]))
        col = torch.from_numpy(positions[sel] - starts[win[sel]])
        for name, h in got.items():
            if name not in out:
                out[name] = np.zeros((len(positions), h.shape[-1]), dtype=np.float32)
            out[name][sel] = h[row, col].float().cpu().numpy()
    return out


def run_cache_dir(cache_dir, run_dir) -> Path:
    """Where the features of a run directory are cached: named after it, keyed by its absolute path."""
    run_dir = Path(run_dir).resolve()
    return Path(cache_dir) / f"{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]}"


def cached_features(run: TrainedRun, key: str, stream: np.ndarray, positions: np.ndarray, cache_dir, **kwargs):
    """:func:`extract`, cached in :func:`run_cache_dir` and keyed by the run's config, its checkpoint (name,
    size, modification time), the inputs and ``key``; stored as float16 and written atomically."""
    digest = hashlib.sha1()
    for part in (stream.tobytes(), positions.tobytes(), (run.dir / "config.yaml").read_bytes(),
                 str(kwargs.get("example_len")).encode()):
        digest.update(part)
    if run.ckpt is not None:
        st = run.ckpt.stat()
        digest.update(f"{run.ckpt.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = f"{key}{'' if run.ckpt else '_random-init'}_{digest.hexdigest()[:12]}.npz"
    path = run_cache_dir(cache_dir, run.dir) / name
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k].astype(np.float32) for k in f.files}
    feats = {k: v.astype(np.float16) for k, v in extract(run.net, stream, positions, **kwargs).items()}
    with atomic_open(path, "wb") as f:
        np.savez(f, **feats)
    return {k: v.astype(np.float32) for k, v in feats.items()}
