"""The documentation stays navigable: every public SQL function of the installed extension has
an entry in docs/sql-reference.md, and every relative link in README.md, docs/*.md and
bench/README.md reaches a file that exists (and, for a #fragment into a Markdown file, one of
its headings)."""
import re
from pathlib import Path

import pytest

from pgcluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
PORT = 25588
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("docs_test", PORT, [])
    c.start(fresh=True)
    try:
        yield c
    finally:
        c.stop()


def public_functions(conn) -> set[str]:
    """Functions of the extension's schema that users call (internal helpers start with _)."""
    return {name for (name,) in conn.execute(
        r"""SELECT p.proname FROM pg_proc p
            JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
            JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'queue_ext'
            WHERE p.proname NOT LIKE '\_%'""")}


def test_every_public_function_is_in_the_sql_reference(cluster):
    with cluster.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        functions = public_functions(conn)
    assert len(functions) > 30, functions  # the catalogue query found the extension's functions
    reference = (ROOT / "docs" / "sql-reference.md").read_text()
    # An entry is a heading of its own, followed by a signature naming the function.
    headings = set(re.findall(r"^### `?([a-z0-9_]+)`?\s*$", reference, re.M))
    signatures = set(re.findall(r"^queue_ext\.([a-z0-9_]+)\(", reference, re.M))
    missing = sorted(functions - (headings & signatures))
    assert not missing, f"public functions missing from docs/sql-reference.md: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def without_code(text: str) -> str:
    """Markdown outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def relative_links(page: Path):
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        yield target


def test_relative_links_reach_existing_files_and_headings():
    assert (ROOT / "docs" / "sql-reference.md").exists()
    broken = []
    checked = 0
    for page in PAGES:
        for target in relative_links(page):
            checked += 1
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 20, checked  # the pages were read and their links found
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_sees_a_broken_link(tmp_path):
    """The checks above can fail: a missing file and a missing heading are both reported."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](missing.md) [b](#title) [c](#nowhere) `[d](in-code.md)`\n"
                    "```\n[e](in-block.md)\n```\n")
    links = list(relative_links(page))
    assert links == ["missing.md", "#title", "#nowhere"]
    assert not (tmp_path / "missing.md").exists()
    assert "title" in anchors(page) and "nowhere" not in anchors(page)
