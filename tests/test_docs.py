"""The README, docs/*.md and benchmarks/README.md point at things that exist: every relative
link resolves (the file, and the heading an ``#anchor`` names), and every ``dcil_jax.X`` /
``experiments.X`` name they mention imports or is an attribute of what does."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)
# A dotted name of the library or the experiments: not part of a path or a longer name.
NAME = re.compile(r"(?<![\w./-])((?:dcil_jax|experiments)(?:\.[A-Za-z_]\w*)+)")
FILE_SUFFIXES = {"md", "py", "json", "png", "txt", "sh", "toml", "jsonl"}


def anchors(path: Path) -> set[str]:
  """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to
  hyphens, a repeated heading numbered."""
  seen: dict[str, int] = {}
  out = set()
  for line in FENCE.sub("", path.read_text()).splitlines():
    match = re.match(r"#{1,6}\s+(.*)", line)
    if not match:
      continue
    slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def test_anchors_follow_github():
  page = ROOT / "docs" / "resuming.md"
  assert "hangs-and-lost-processes" in anchors(page)
  assert "nan-and-inf" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_relative_link_resolves(page):
  broken = []
  for target in LINK.findall(page.read_text()):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      broken.append(f"{target}: not a relative link")
      continue
    file, _, anchor = target.partition("#")
    path = (page.parent / file).resolve() if file else page
    if not path.exists():
      broken.append(f"{target}: no such file")
    elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
      broken.append(f"{target}: no heading #{anchor} in {path.name}")
  assert not broken, f"{page.name}:\n" + "\n".join(broken)


def resolve(name: str) -> None:
  """Imports the longest module prefix of ``name`` and gets the rest as attributes."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError as e:
      if e.name is None or not ".".join(parts[:i]).startswith(e.name):
        raise  # the module exists but imports something missing
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_library_and_experiments_name_exists(page):
  names = {n for n in NAME.findall(page.read_text()) if n.rsplit(".", 1)[1] not in FILE_SUFFIXES}
  missing = []
  for name in sorted(names):
    try:
      resolve(name)
    except (ImportError, AttributeError) as e:
      missing.append(f"{name}: {type(e).__name__}: {e}")
  assert not missing, f"{page.name}:\n" + "\n".join(missing)
