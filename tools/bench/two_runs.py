#!/usr/bin/env python3
"""Sets two full runs (two BENCHMARKS.md files written by tools/bench/run.sh) side by side,
target by target: a target counts as met only where the median meets it in both runs.

Usage: tools/bench/two_runs.py FIRST.md SECOND.md
       (for a committed run: git show REV:BENCHMARKS.md > /tmp/first.md)
       tools/bench/two_runs.py --insert FIRST.md SECOND.md
Prints a Markdown table: each row that has a target, the figure its target is judged on in
each run, each run's verdict, and whether it is met in both. With --insert, writes that table
into SECOND.md instead, as a section before its results (replacing one written before), headed
by when each run finished and which build each ran: "on one build" only where both runs' build
lines name the same binary (build time and md5; tools/bench/twice.sh makes such runs).
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


def table(first_path, second_path):
    """The side-by-side table's lines."""
    first = dict(rows(first_path))
    second = dict(rows(second_path))
    out = ["| Row | Target | First run | Second run | Met in both |", "|---|---|---|---|---|"]
    for label, b in second.items():
        a = first.get(label)
        short = label.split(". ")[0] if re.match(r"^\d+[a-z]?\. ", label) else label
        one = cell(a) if a else "not run"
        both = "yes" if a and verdict(a) == verdict(b) == "PASS" else "**no**"
        out.append(f"| {short} | {b['Target (issue)']} | {one} | {cell(b)} | {both} |")
    for label in first.keys() - second.keys():
        out.append(f"| {label} | {first[label]['Target (issue)']} | {cell(first[label])} | not run | **no** |")
    return out


BEGIN, END = "<!-- two_runs: begin -->", "<!-- two_runs: end -->"


def run_facts(path):
    """(when the run finished, its minutes, the build it ran) from a BENCHMARKS.md's header."""
    text = Path(path).read_text()
    when = re.search(r"^on (\d{4}-\d\d-\d\d \d\d:\d\d UTC); the whole run took\s+([\d.]+) minutes", text, re.M)
    build = re.search(r"^\| cowdisk \| (.*) \|$", text, re.M)
    if not when or not build:
        sys.exit(f"{path}: no run date or no cowdisk build line (not a full run's BENCHMARKS.md?)")
    return when.group(1), when.group(2), build.group(1)


def binary(build):
    """The part of a build line that names the binary: its build time and md5."""
    m = re.search(r"binary built (.*)$", build)
    return m.group(1) if m else build


def section(first_path, second_path):
    (w1, m1, b1), (w2, m2, b2) = run_facts(first_path), run_facts(second_path)
    if (w1, m1) == (w2, m2):
        sys.exit(f"{first_path} and {second_path} are the same run")
    # One build is one binary: the same build time and md5. The line's note that the working
    # tree had uncommitted changes says nothing about the binary (a test file edited during the
    # second run sets it), so it is left out of the comparison.
    one_build = binary(b1) == binary(b2)
    head = "## Two runs back to back on one build" if one_build else "## Two runs side by side (not one build)"
    if b1 == b2:
        build = f"Both ran {b2}."
    elif one_build:
        build = f"Both ran the same binary. The first run's build line: {b1}; this one's: {b2}."
    else:
        build = f"The first ran {b1}; this one {b2}."
    return "\n".join([
        BEGIN,
        head,
        "",
        f"The run before this one finished {w1} after {m1} minutes; this one {w2} after {m2} minutes. "
        f"{build} A target counts as met only where the median meets it in both. Made by "
        "`tools/bench/two_runs.py --insert FIRST.md BENCHMARKS.md`, FIRST.md being the first run's file:",
        "",
        *table(first_path, second_path),
        END,
        "",
    ])


def insert(first_path, second_path):
    p = Path(second_path)
    text = p.read_text()
    begin, end = text.find(BEGIN), text.find(END)
    if 0 <= begin < end:
        text = text[:begin] + text[end + len(END):].lstrip("\n")
    at = text.find("## Results")
    if at < 0:
        sys.exit(f"{second_path}: no results section")
    p.write_text(text[:at] + section(first_path, second_path) + "\n" + text[at:])


def main():
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "--insert":
        insert(args[1], args[2])
    elif len(args) == 2:
        print("\n".join(table(*args)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
