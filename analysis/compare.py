"""Tables and plots of a sweep: every group of runs (same overrides but the seed) against end-to-end.

    python analysis/compare.py logs/multiruns/<sweep dir>                 # writes into <sweep dir>/compare/
    python analysis/compare.py <multirun or run dir> [more ...] --out <dir>

Prints the markdown table; writes compare.md, compare.csv (one row per group), runs.csv (one row per
run, with its status) and val_curves.png, loss_by_depth.png, loss_vs_wall.png; where they apply, answer_curves.png
(tasks), kept_by_chunks.png (depth_benefit sweeps) and synthetic_cosines.png (method=synthetic).
"""

import argparse
import sys
from pathlib import Path

from locallearn.analysis.compare import write_report
from locallearn.analysis.sweeps import report_dir
from locallearn.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun or run directories")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <multirun dir>/compare, "
                        "or <run dir>_compare beside a single run)")
    args = parser.parse_args(argv)
    out = args.out or report_dir(args.dirs[0], "compare")
    try:
        write_report(args.dirs, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "compare.md").read_text(encoding="utf-8"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
