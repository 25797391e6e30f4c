"""Small readers for the deployment files, shared by the deploy tests.

They read just enough of each format to check what docker-compose.yml, the Dockerfile,
.dockerignore and the Grafana dashboard promise, without a Docker engine or Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

# --- Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped.

    >>> dockerfile_instructions("FROM x AS a\\nRUN a \\\\\\n  # note\\n  && b\\n")
    [('FROM', 'x AS a'), ('RUN', 'a   && b')]
    """
    instructions, pending = [], ""
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue  # Docker drops these, even inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            keyword, _, arguments = whole.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage, which is the image that runs."""
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


def healthcheck_command(arguments: str) -> str | list[str]:
    """The probe of `HEALTHCHECK [--option=value ...] CMD ...`: shell text or an exec list."""
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.+)", arguments.strip(), re.DOTALL)
    assert match, f"HEALTHCHECK without CMD: {arguments!r}"
    command = match.group(1).strip()
    return json.loads(command) if command.startswith("[") else command


# --- .dockerignore ----------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` stay within one path segment, `**` spans any."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per pattern line of a .dockerignore, in order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.removeprefix("!").strip().removeprefix("./").strip("/")
        rules.append((exception, _glob_regex(pattern)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `path` (relative, with /) out.

    A pattern that matches a folder leaves out everything in it; the last matching
    pattern wins, so `!pattern` lines bring paths back.
    """
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not exception
    return ignored


# --- PromQL in the Grafana dashboard ----------------------------------------------------

# Words that can stand where a metric name would and are not one.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Grafana's template query: label_values(metric, label) or label_values(label).
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:([^,()]+?)\s*,\s*)?[\w.]+\s*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects.

    >>> sorted(promql_metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / b or vector(0)'))
    ['a_bucket', 'b']
    """
    expr = _LABEL_VALUES.sub(lambda match: match.group(1) or "", expr)
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors and subqueries
    expr = _LABEL_LIST.sub(" ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables outside the brackets
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        word = match.group()
        if word in PROMQL_KEYWORDS or expr[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function or aggregation being called
        names.add(word)
    return names


def exported_series_names(registry) -> set[str]:
    """Every series name a prometheus_client registry exposes, by metric type.

    Counters are exposed as `<family>_total`, histograms as `_bucket`, `_sum` and
    `_count`, gauges under the family name itself. (`_created` series are left out: no
    panel should need them.)
    """
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    return {
        family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]
    }


def dashboard_queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query of a Grafana dashboard."""

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))  # panels inside collapsed rows

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            yield f"variable {variable.get('name')!r}", query


def unknown_metrics(dashboard: dict, known: set[str]) -> dict[str, set[str]]:
    """where -> metric names its query uses that are not in `known`."""
    unknown = {}
    for where, expr in dashboard_queries(dashboard):
        missing = promql_metric_names(expr) - known
        if missing:
            unknown[where] = missing
    return unknown


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
