"""Run the evaluation for several methods (and datasets) with the same settings, then compare.

    python bench/eval_sweep.py --out runs/sweep --datasets counterfact zsre --methods alphaedit memit \
        -- --n 500 --batch-size 50 --device cuda

Everything after `--` goes to every `knowpatch eval` run unchanged. Each run lands in
OUT/<dataset>-<method>; OUT/<dataset>-compare holds the combined table and plots. Runs already
finished (their results.json exists) are skipped, so an interrupted sweep can be resumed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.cli import main as eval_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=["counterfact"], choices=["counterfact", "zsre"])
    parser.add_argument("--methods", nargs="+", default=["alphaedit", "memit"], choices=["alphaedit", "memit"])
    args = parser.parse_args(own)
    for dataset in args.datasets:
        runs = []
        for method in args.methods:
            run = args.out / f"{dataset}-{method}"
            runs.append(str(run))
            if (run / "results.json").is_file():
                print(f"{run}: done already, skipped")
                continue
            code = eval_main(["eval", dataset, "--method", method, "--out", str(run), *shared])
            if code != 0:
                return code
        eval_main(["eval-compare", *runs, "--out", str(args.out / f"{dataset}-compare")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
