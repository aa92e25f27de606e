"""Every link, path and lh_cp name that the docs (README.md, docs/*.md, benchmarks/NOTES.md) mention exists.

Checked in each document:
- Markdown links and images `[text](target)` with a relative target: the file or folder exists,
  resolved from the document's folder, and a `#fragment` names a heading of the target page
  (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats).
- Repository paths anywhere in the text, code included: a word that starts with a top-level
  folder of the repository (`lh_cp/`, `parallel/`, `recipes/`, ...) exists; globs (`*`) and
  braces (`{a,b}`) must match something.
- Dotted names `lh_cp.x.y.name`: the module exists (`lh_cp.parallel` is the `parallel/` folder)
  and the first name after it is defined or imported there.
Pages that other branches are adding may be missing until they land (PENDING_PAGES); once
present they are checked like the rest.
"""

import glob
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "benchmarks" / "NOTES.md",
]
TOP_LEVEL = ("lh_cp", "parallel", "recipes", "launch", "tests", "benchmarks", "docs", ".ci")
PENDING_PAGES: set[str] = set()

FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.M)
PATH = re.compile(
    r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP_LEVEL) + r")/"
    r"(?:[\w./*-]|\{[\w,.-]*\})*)"
)
DOTTED = re.compile(r"(?<![\w.])lh_cp(?:\.\w+)+")
OUTPUT_OPTION = re.compile(r"--(?:out|result) $")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a Markdown page (headings inside code fences do not count)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for part in match.group(1).split(",") for p in expand_braces(head + part + tail)]


def path_exists(relative: str) -> bool:
    if relative in PENDING_PAGES:
        return True
    for candidate in expand_braces(relative):
        if "*" in candidate:
            if not glob.glob(str(REPO / candidate)):
                return False
        elif not (REPO / candidate).exists():
            return False
    return True


def link_problems(document: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        if not file_part:  # a heading of this page
            if fragment not in anchors(text):
                problems.append(f"link to a missing heading: {target}")
            continue
        page = (document.parent / file_part).resolve()
        relative = page.relative_to(REPO).as_posix() if page.is_relative_to(REPO) else str(page)
        if relative in PENDING_PAGES and not page.exists():
            continue
        if not page.exists():
            problems.append(f"link to a missing file: {target}")
        elif fragment and page.suffix == ".md" and fragment not in anchors(page.read_text()):
            problems.append(f"link to a missing heading: {target}")
    return problems


def defines(module: Path, name: str) -> bool:
    source = module.read_text()
    definition = (
        rf"^\s*(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]|^\s*(?:from|import)\b.*\b{name}\b"
    )
    return (
        re.search(definition, source, flags=re.M) is not None
        or re.search(rf"^from\s+\S+\s+import\s+\([^)]*\b{name}\b", source, flags=re.M) is not None
    )


def dotted_problem(name: str) -> str | None:
    parts = name.split(".")
    where = REPO / "lh_cp"
    if parts[1:2] == ["parallel"]:
        where, parts = REPO / "parallel", parts[1:]
    for i, part in enumerate(parts[1:], start=1):
        if (where / part).is_dir():
            where = where / part
        elif (where / f"{part}.py").is_file():
            if i + 1 < len(parts) and not defines(where / f"{part}.py", parts[i + 1]):
                return f"{name}: {parts[i + 1]} is not defined in {where / part}.py"
            return None
        elif (where / "__init__.py").is_file():
            return None if defines(where / "__init__.py", part) else f"{name}: no {part} in {where}"
        else:
            return f"{name}: no module or package {where / part}"
    return None


def problems_of(document: Path, text: str) -> list[str]:
    problems = link_problems(document, text)
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if OUTPUT_OPTION.search(text[max(0, match.start() - 9) : match.start()]):
            continue  # a file a command writes (--out PATH) need not exist yet
        if not path_exists(path):
            problems.append(f"missing path: {path}")
    for name in DOTTED.findall(text):
        problem = dotted_problem(name)
        if problem:
            problems.append(problem)
    return problems


def test_every_link_path_and_name_in_the_docs_exists():
    found = {
        doc.relative_to(REPO).as_posix(): problems_of(doc, doc.read_text()) for doc in DOCUMENTS
    }
    assert {doc: p for doc, p in found.items() if p} == {}


def test_the_checker_reports_what_is_broken():
    """A page with one broken thing of each kind, next to working ones, is reported exactly."""
    page = REPO / "docs" / "example.md"
    text = "\n".join(
        [
            "# A page",
            "## Second part",
            "[ok](training.md) [ok](#second-part) [ok](../README.md) [web](https://example.com/x)",
            "[gone](nowhere.md) [bad anchor](#no-such-part) `lh_cp/ops/config.py` `launch/run.sh`",
            "`lh_cp/ops/nothing.py` and tests/test_docs_links.py and benchmarks/results/*.json",
            "`lh_cp.ops.config.LighthouseConfig` `lh_cp.parallel.build_mesh` `lh_cp.ops.config.Nope`",
            "```bash",
            "# not a heading",
            "python benchmarks/missing_script.py",
            "```",
        ]
    )
    assert problems_of(page, text) == [
        "link to a missing file: nowhere.md",
        "link to a missing heading: #no-such-part",
        "missing path: lh_cp/ops/nothing.py",
        "missing path: benchmarks/missing_script.py",
        f"lh_cp.ops.config.Nope: Nope is not defined in {REPO / 'lh_cp/ops/config'}.py",
    ]
    assert anchors('# A b\n## A b\n```\n# c\n```\n## What "x" means: (y)') == {
        "a-b",
        "a-b-1",
        "what-x-means-y",
    }
