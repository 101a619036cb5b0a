#!/usr/bin/env python3
"""Sets two full runs (two BENCHMARKS.md files written by tools/bench/run.sh) side by side,
target by target: a target counts as met only where the median meets it in both runs.

Usage: tools/bench/two_runs.py FIRST.md SECOND.md
       (for a committed run: git show REV:BENCHMARKS.md > /tmp/first.md)
Prints a Markdown table: each row that has a target, the figure its target is judged on in
each run, each run's verdict, and whether it is met in both.
"""
import re
import sys
from pathlib import Path


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def rows(path):
    """Yields (row label, {column: cell}) for every row of the results tables that has a verdict."""
    header = None
    for line in Path(path).read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        c = cells(line)
        if header is None:
            header = c
            continue
        if set(line) <= set("|-: "):
            continue
        row = dict(zip(header, c))
        if "Result" in row and row["Result"]:
            yield row[header[0]], row


def figure(row):
    """The measured figure a row's target is judged on (the cell the target names)."""
    target = row.get("Target (issue)", "")
    picks = []
    if "nbdkit" in target and "cowdisk ÷ nbdkit" in row:
        picks.append(("÷ nbdkit", row["cowdisk ÷ nbdkit"]))
    if "qcow2 extended_l2" in target:
        picks.append(("÷ qcow2-el2", row["cowdisk ÷ qcow2-el2"]))
    elif re.search(r"\bqcow2\b", target) and "cowdisk ÷ qcow2" in row:
        picks.append(("÷ qcow2", row["cowdisk ÷ qcow2"]))
    if picks:
        return ", ".join(f"{v} {k}" for k, v in picks)
    if row.get("Ratio", "—") not in ("—", ""):
        return row["Ratio"]
    return row.get("cowdisk", "?").split(" (")[0]


def verdict(row):
    return "PASS" if row["Result"].startswith("PASS") else "FAIL"


def cell(row):
    """One run's cell: the judged figure and the verdict."""
    return f"{figure(row)} {verdict(row)}"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    first = dict(rows(sys.argv[1]))
    second = dict(rows(sys.argv[2]))
    print("| Row | Target | First run | Second run | Met in both |")
    print("|---|---|---|---|---|")
    for label, b in second.items():
        a = first.get(label)
        short = label.split(". ")[0] if re.match(r"^\d+[a-z]?\. ", label) else label
        one = cell(a) if a else "not run"
        both = "yes" if a and verdict(a) == verdict(b) == "PASS" else "**no**"
        print(f"| {short} | {b['Target (issue)']} | {one} | {cell(b)} | {both} |")
    for label in first.keys() - second.keys():
        print(f"| {label} | {first[label]['Target (issue)']} | {cell(first[label])} | not run | **no** |")


if __name__ == "__main__":
    main()
