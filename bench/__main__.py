"""Run every scenario against runtimed and containerd in alternation; print a table
(ours, containerd's, ratio), write bench/results/latest.json and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from bench.daemons import Containerd, Runtimed
from bench.measure import Series
from bench.scenarios import Target, close_registry, scenarios

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} × {cpu}, {mem_gib:.0f} GiB, Linux {platform.release()}"


def peer_versions() -> str:
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"
    return f"{first_line(['containerd', '--version'])}; {first_line(['runc', '--version'])}"


def run(selected: list[str] | None, quick: bool) -> list[dict]:
    ours = Runtimed()
    ours.start()
    theirs = None
    if Containerd.available():
        theirs = Containerd()
        theirs.start()
    targets = [Target(ours)] + ([Target(theirs)] if theirs else [])
    results = []
    try:
        for scenario in scenarios(quick):
            if selected and not any(s.lower() in scenario.name.lower() for s in selected):
                continue
            series = {t.name: Series(scenario.unit) for t in targets}
            for t in targets:
                if scenario.setup:
                    scenario.setup(t)
                scenario.measure(t)  # warm-up
            runs = max(1, scenario.runs // 4) if quick else scenario.runs
            for _ in range(runs):
                for t in targets:  # A B A B ...
                    series[t.name].samples.append(scenario.measure(t))
            for t in targets:
                if scenario.teardown:
                    scenario.teardown(t)
            row = {"scenario": scenario.name, "unit": scenario.unit, "target": scenario.target,
                   "runs": runs}
            for name, s in series.items():
                row[name] = {"median": s.median, "p90": s.p90}
            if theirs:
                row["ratio"] = row["runtimed"]["median"] / row["containerd"]["median"]
            results.append(row)
            print_row(row)
    finally:
        close_registry()
        for t in targets:
            t.close()
        ours.stop()
        if theirs:
            theirs.stop()
    return results


def print_row(row: dict) -> None:
    def fmt(side):
        if side not in row:
            return "-"
        return f"{row[side]['median']:.3g} (p90 {row[side]['p90']:.3g})"

    ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
    print(f"{row['scenario']:<34} {row['unit']:>5} {fmt('runtimed'):>22} {fmt('containerd'):>22} "
          f"{ratio:>6}  target {row['target']}", flush=True)


def write_reports(results: list[dict]) -> None:
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "peer": peer_versions(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Benchmarks", "",
        f"Measured {report['date']} on {report['machine']}; peer: {report['peer']}.",
        "Median (p90) of alternating runs; ratio = runtimed / containerd (lower is better",
        "except for throughput). Regenerate with `make bench`.", "",
        "| scenario | unit | runtimed | containerd | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in results:
        ours = row["runtimed"]
        theirs = row.get("containerd")
        lines.append(
            f"| {row['scenario']} | {row['unit']} | {ours['median']:.3g} ({ours['p90']:.3g}) | "
            + (f"{theirs['median']:.3g} ({theirs['p90']:.3g})" if theirs else "-")
            + f" | {row.get('ratio', float('nan')):.2f} | {row['target']} |"
        )
    notes = REPO / "docs" / "benchmarks-notes.md"
    if notes.exists():
        lines += ["", notes.read_text()]
    (REPO / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("scenarios", nargs="*", help="substrings of scenario names to run")
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller sizes")
    args = parser.parse_args()
    print(f"{'scenario':<34} {'unit':>5} {'runtimed':>22} {'containerd':>22} {'ratio':>6}")
    results = run(args.scenarios, args.quick)
    if not args.scenarios:
        write_reports(results)


if __name__ == "__main__":
    main()
