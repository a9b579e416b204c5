"""Render a `ktcli bench -o json` results file as the markdown table (ratios recomputed from the samples).

    python benchmarks/render.py benchmarks/results/2026-11-24-h100-bench-qwen3-30b-a3b.json
"""
import json
import sys

from ktcli.report.bench import add_baseline_ratios, finish, md

for path in sys.argv[1:]:
    with open(path) as f:
        d = json.load(f)
    records = [finish(r) for r in d["results"]]
    add_baseline_ratios(records)
    print(md(records, d))
