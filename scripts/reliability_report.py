#!/usr/bin/env python3
"""Writes the figures recorded by the SQL tests into docs/RELIABILITY.md.

    python3 scripts/reliability_report.py target/reliability-figures.jsonl docs/RELIABILITY.md

`scripts/test.sh` runs this after the SQL tests pass. Every test in
tests/tests/reliability.rs and tests/tests/load.rs appends one JSON line
{"test": ..., "figures": {...}} (calls made, faults injected, rows checked,
timings); the table between the `figures:begin` / `figures:end` markers of
the page is replaced by one row per test of this run. Standard library only.
"""
import datetime
import json
import platform
import subprocess
import sys

BEGIN = "<!-- figures:begin -->"
END = "<!-- figures:end -->"


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v).replace("|", "\\|")


def main(figures_path, page_path):
    rows = []
    with open(figures_path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    if not rows:
        sys.exit(f"{figures_path}: no figures recorded")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    import os
    lines = [
        BEGIN,
        "",
        f"Last run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit `{commit or 'unknown'}`, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU(s) ({cpu or 'unknown CPU'}); "
        f"written by `scripts/test.sh` from `{os.path.basename(figures_path)}`.",
        "",
        "| test | figures |",
        "|---|---|",
    ]
    for r in rows:
        figs = ", ".join(f"{k} = {fmt(v)}" for k, v in sorted(r["figures"].items()))
        lines.append(f"| `{r['test']}` | {figs} |")
    lines += ["", END]
    with open(page_path) as f:
        page = f.read()
    if BEGIN not in page or END not in page:
        sys.exit(f"{page_path}: missing the {BEGIN} / {END} markers")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(page_path, "w") as f:
        f.write(head + "\n".join(lines) + tail)
    print(f"reliability_report: {len(rows)} tests' figures written to {page_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
