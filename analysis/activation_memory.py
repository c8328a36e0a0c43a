"""Activation memory per training step, by number of chunks and execution mode.

Counts the bytes autograd saves for backward in one training step (the peak held at any one time,
see locallearn.training.memory), on the CPU, deterministically. Prints a markdown table and writes JSON.

    python analysis/activation_memory.py                       # model=small, batch 12, vocab 65
    python analysis/activation_memory.py --model base --batch 8 --chunks 1 2 4 8 --out mem.json
    python analysis/activation_memory.py --chunks 1 4 --interlock 1 2 4   # n-wise interlocking: what it holds
"""

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from locallearn.atomic import write_json
from locallearn.config import compose_run_config
from locallearn.model.chunked import ChunkedGPT
from locallearn.model.gpt import GPT, GPTConfig
from locallearn.model.heads import LinearHead
from locallearn.model.objectives import CausalLM
from locallearn.model.plan import ChunkPlan
from locallearn.training.memory import SavedTensorMeter
from locallearn.training.update import joint_backward, sequential_backward

BACKWARD = {"joint": joint_backward, "sequential": sequential_backward}  # pipeline: per process, sequential's
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def measure(cfg: GPTConfig, chunks: int, mode: str, batch: int, seed: int = 0, interlock: int = 1) -> int:
    torch.manual_seed(seed)
    net = ChunkedGPT(GPT(cfg), ChunkPlan.build(cfg.n_layer, chunks, interlock=interlock), LinearHead)
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size + 1))
    objective = CausalLM()
    prepared = objective.prepare(x)
    with SavedTensorMeter(net.parameters()) as meter:
        BACKWARD[mode](net, prepared.idx, lambda k, h, logits: objective.loss(logits, h, prepared),
                    lambda loss: loss.backward(), [1.0] * chunks)
    return meter.peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="a preset in conf/model/")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=65, help="vocabulary size (65: tiny Shakespeare)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--interlock", type=int, nargs="+", default=[1],
                    help="n of n-wise interlocking, each with every K > 1 (1: local learning)")
    ap.add_argument("--out", default="activation_memory.json")
    args = ap.parse_args()
    if not (CONF / f"{args.model}.yaml").is_file():
        presets = ", ".join(sorted(p.stem for p in CONF.glob("*.yaml")))
        ap.error(f"--model {args.model} is not a preset in conf/model/ ({presets})")
    # The preset as the run config composes it (model.causal follows the objective: an interpolation)
    node = compose_run_config(".", [f"model={args.model}"]).model
    cfg = GPTConfig(**{k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"},
                    vocab_size=args.vocab)
    rows = []
    for mode in ("joint", "sequential"):  # pipeline holds per process what sequential holds
        for k in args.chunks:
            for n in sorted({1} | set(args.interlock)) if k > 1 else [1]:
                rows.append({"model": args.model, "batch": args.batch, "mode": mode, "chunks": k, "interlock": n,
                             "bytes": measure(cfg, k, mode, args.batch, interlock=n)})
    base = {r["mode"]: r["bytes"] for r in rows if r["chunks"] == args.chunks[0] and r["interlock"] == 1}
    print(f"| mode | chunks | interlock | activation bytes | vs chunks={args.chunks[0]} |\n|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["bytes"] / base[r["mode"]]
        print(f"| {r['mode']} | {r['chunks']} | {r['interlock']} | {r['bytes']:,} | {r['ratio']:.3f} |")
    write_json(args.out, rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
