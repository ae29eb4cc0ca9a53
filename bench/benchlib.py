"""Shared pieces of the bench report scripts (report.py, catalog-report.py,
dns-report.py, proxy-cost-report.py, proxy-report.py, watch-report.py).

A report script lives next to this file, so `import benchlib` works when it
is run as `python3 bench/<script>.py` (Python puts the script's directory
first on sys.path).

- reading raw data: read_text, read_kv (machine.txt / meta.txt), read_tsv,
  read_jsonl
- numbers: percentile (nearest rank), percentile_index (floor index),
  ratio, fmt, mib
- markdown: md_row, md_header, fenced, reproduce
- logs: ANSI, strip_ansi
"""

import json
import math
import os
import re

# ---------------------------------------------------------------- raw files


def read_text(raw, name, default=""):
    """The text of RAW/NAME (undecodable bytes replaced), or default if it cannot be read."""
    try:
        with open(os.path.join(raw, name), errors="replace") as f:
            return f.read()
    except OSError:
        return default


def read_kv(raw, name, required=False):
    """KEY=VALUE lines of RAW/NAME as a dict (lines without '=' are skipped).
    A missing file gives {} unless required (then it raises)."""
    path = os.path.join(raw, name)
    if required and not os.path.exists(path):
        raise FileNotFoundError(path)
    out = {}
    for line in read_text(raw, name).splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def read_tsv(raw, name):
    """Tab-separated lines of RAW/NAME, blank lines skipped ([] if missing)."""
    return [line.split("\t") for line in read_text(raw, name).splitlines() if line.strip()]


def read_jsonl(raw, name, strict=False):
    """One JSON value per non-blank line of RAW/NAME. strict: the file must
    exist and every line must parse; otherwise a missing file gives [] and an
    unparsable line gives {"kind": "failed", "error": ...}."""
    if strict:
        with open(os.path.join(raw, name)) as f:
            return [json.loads(line) for line in f if line.strip()]
    out = []
    for line in read_text(raw, name).splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"kind": "failed", "error": "unparsable line: " + line[:200]})
    return out


# ---------------------------------------------------------------- numbers


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list (None if empty): the
    smallest value with at least p % of the values at or below it."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def percentile_index(sorted_values, p, empty=0):
    """The value at index floor(p % of n) of an ascending list (empty if
    there is none). One rank above percentile() when p % of n is a whole
    number; kept for the numbers that were always computed this way
    (proxy.sh's h2load latencies)."""
    if not sorted_values:
        return empty
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


def ratio(a, b, suffix="x", digits=2, zero="n/a"):
    """a / b as text ("1.25x"), or `zero` if b is 0 or None."""
    return f"{a / b:.{digits}f}{suffix}" if b else zero


def fmt(v, nd=1):
    """None -> "–", a float with nd decimals, anything else as str()."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def mib(kib):
    """KiB -> MiB with one decimal, as text."""
    return f"{kib / 1024:.1f}"


# ---------------------------------------------------------------- markdown


def md_row(cells):
    """| a | b | c |"""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_header(columns, align=""):
    """The two header lines of a table; align has one letter per column,
    l (---) or r (---:); missing letters are l."""
    seps = ["---:" if i < len(align) and align[i] == "r" else "---" for i in range(len(columns))]
    head = "|" + "|".join(f" {c} " if c != "" else " " for c in columns) + "|"  # an empty title: "| |"
    return [head, "|" + "|".join(seps) + "|"]


def fenced(text, lang=""):
    """A fenced code block, as lines."""
    return ["```" + lang, text, "```"]


def reproduce(intro, command):
    """The "command to reproduce" block of a report, as lines: the intro
    sentence, a blank line, the command in a sh block, a blank line."""
    return [intro, ""] + fenced(command, "sh") + [""]


# ---------------------------------------------------------------- logs

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(line):
    return ANSI.sub("", line)
