"""Plot the adherence curves (OUTPUT_DIR/curve.jsonl) of several text-to-image runs into one PNG:

    python configs/demo/plot_curves.py -o docs/demo-training-curves.png NAME=runs/demo/t2i-a NAME=runs/demo/t2i-b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.evaluation.report import plot_curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR", help="a label and a run's output folder")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    args = p.parse_args()
    curves = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        lines = (Path(folder) / "curve.jsonl").read_text().splitlines()
        curves[name] = sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["samples"])
    plot_curves(curves, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
