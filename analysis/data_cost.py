"""What drawing a training batch costs, per data set, against a training step of the model it feeds.

    python analysis/data_cost.py                        # model=small, chunks=2, every generated data set
    python analysis/data_cost.py --set model.n_layer=2 --out logs/bench/data_cost.json

For each data option: the median time of drawing one training batch (``train_dataloader()``'s dataset,
batch by step, as training draws it) over --batches batches, and the median time of one training step of
the same config (forward, backward and optimizer step of every chunk, ``mode=joint``) over --steps steps,
in one process. Prints a markdown table (the batch's share of a step; the target is at most 2%) and writes
JSON (--out).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from locallearn.atomic import write_text
from locallearn.build import quiet_lightning
from locallearn.config import PROJECT_ROOT, compose_run_config
from locallearn.runner import build

DATA = ["synthetic", "mqar", "induction", "khop"]


def measure(data: str, overrides: list[str], batches: int, steps: int, out_dir: Path) -> dict:
    cfg = compose_run_config(out_dir / data, [f"data={data}", "trainer.enable_progress_bar=false", *overrides])
    run = build(cfg)
    dataset = run.datamodule.train_dataloader().dataset
    times = []
    for n in range(batches):
        t0 = time.perf_counter()
        batch = dataset.batch(n)
        times.append(time.perf_counter() - t0)
    module, net = run.module, run.module.net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step_times = []
    for n in range(steps + 3):  # the first steps warm up the allocator
        batch = dataset.batch(n)
        t0 = time.perf_counter()
        prepared = module.objective.prepare(batch)
        opt.zero_grad(set_to_none=True)
        loss = sum(module.objective.loss(logits, h, prepared) for h, logits in net(prepared.idx))
        loss.backward()
        opt.step()
        if n >= 3:
            step_times.append(time.perf_counter() - t0)
    batch_s, step_s = statistics.median(times), statistics.median(step_times)
    return {"data": data, "batch_ms": 1e3 * batch_s, "step_ms": 1e3 * step_s, "share_pct": 100 * batch_s / step_s,
            "batch_shape": list(batch.shape)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=DATA, choices=DATA)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.n_layer=2")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "logs" / "bench" / "data_cost.json")
    args = parser.parse_args(argv)
    quiet_lightning()
    torch.manual_seed(0)
    rows = [measure(d, ["chunks=2", *args.set], args.batches, args.steps, args.out.parent / "data_cost_runs")
            for d in args.data]
    lines = ["| data | batch (B, T+1) | draw a batch | training step | share |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['data']} | {tuple(r['batch_shape'])} | {r['batch_ms']:.3f} ms | {r['step_ms']:.1f} ms | "
              f"{r['share_pct']:.2f}% |" for r in rows]
    print("\n".join(lines))
    write_text(args.out, json.dumps({"overrides": args.set, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
