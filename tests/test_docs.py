"""docs/spec.md holds every model fact the code relies on, and comments cite it by section number. These tests keep
the citations honest: each one must name a heading that exists, nothing may point at design notes that a clone of
the repository does not have, and a bare "spec" citation (which file?) is refused.

The section sign is written as an escape in this file so that the file does not cite anything itself."""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
SECTION_SIGN = "\u00a7"

# Design notes that once lived outside the repository; their facts are in docs/spec.md now.
OUTSIDE_NOTES = ("ideogram4" + "-spec.md", "gguf-and" + "-kernels.md", "comfyui" + "-notes.md")

# A section number: 2.5, 2.2.1, G6.2 (GGUF part), C1.6 (ComfyUI part).
NUMBER = r"[GC]?\d+(?:\.\d+)*"
HEADING = re.compile(rf"^#+[ \t]+({NUMBER})\.?[ \t]", re.M)
# One section reference, optionally a range: "<sign>3.2", "<sign>3.2-3.4", "<sign>G8.1-<sign>G8.3".
REFERENCE = rf"{SECTION_SIGN}{NUMBER}(?:[ \t]*-[ \t]*{SECTION_SIGN}?{NUMBER})?"
# A citation: docs/spec.md followed by one or more references, e.g. "docs/spec.md <sign>2.6, <sign>9 #9" or
# "docs/spec.md <sign>G6.2 and <sign>G8.2".
CITATION = re.compile(rf"docs/spec\.md`?\s*{REFERENCE}(?:[ \t]+#\d+)?(?:(?:\s*(?:,|/|and|or)\s*){REFERENCE}"
                      rf"(?:[ \t]+#\d+)?)*")
NUMBERS_IN = re.compile(rf"{SECTION_SIGN}?({NUMBER})")
SIGN_NUMBER = re.compile(rf"{SECTION_SIGN}({NUMBER})")
# "spec <sign>2.5" or "spec.md <sign>2.5" without the docs/ folder in front.
BARE_SPEC = re.compile(rf"(?<![\w/.-])spec(?:\.md)?`?[ \t]*{SECTION_SIGN}")

# Files whose text is code or documentation (data files such as a tokenizer vocabulary may hold the sign).
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".cfg", ".ini", ".txt", ".js", ".yaml", ".yml"}
DATA_FOLDERS = ("tests/data/",)


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listing.decode().split("\0") if name and (ROOT / name).is_file()]


def read_text(name: str) -> str | None:
    data = (ROOT / name).read_bytes()
    if b"\0" in data:
        return None  # binary (images)
    return data.decode("utf-8", errors="replace")


def source_texts() -> dict[str, str]:
    """Code and documentation, tracked, plus docs/spec.md (checked even before it is committed)."""
    names = [n for n in tracked_files() if not n.startswith(DATA_FOLDERS)
             and (pathlib.PurePath(n).suffix in TEXT_SUFFIXES or "." not in pathlib.PurePath(n).name)]
    texts = {name: text for name in names if (text := read_text(name)) is not None}
    texts.setdefault("docs/spec.md", SPEC.read_text())
    return texts


def spec_sections() -> set[str]:
    return set(HEADING.findall(SPEC.read_text()))


def line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def test_spec_headings_are_numbered_once():
    numbers = HEADING.findall(SPEC.read_text())
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not duplicates, f"docs/spec.md numbers these sections twice: {duplicates}"
    # the parts the citations rely on: the model (1-11), GGUF and kernels (G), ComfyUI core (C)
    assert {"2.5", "3.2", "4.3", "5.2", "9", "G3.1", "G4.4", "G6.2", "G8.2", "C1.6"} <= set(numbers)


def test_every_citation_names_an_existing_section():
    sections = spec_sections()
    broken = []
    for name, text in source_texts().items():
        for match in CITATION.finditer(text):
            # "#9" after a reference is a table row, not a section
            cited = NUMBERS_IN.findall(re.sub(r"#\d+", "", match.group(0)[len("docs/spec.md"):]))
            broken += [f"{name}:{line_of(text, match.start())}: {n} ({match.group(0)!r})"
                       for n in cited if n not in sections]
    assert not broken, "citations of sections docs/spec.md does not have:\n" + "\n".join(broken)


def test_spec_cross_references_exist():
    text = SPEC.read_text()
    sections = spec_sections()
    missing = [f"docs/spec.md:{line_of(text, m.start())}: {m.group(1)}" for m in SIGN_NUMBER.finditer(text)
               if m.group(1) not in sections]
    assert not missing, "docs/spec.md refers to sections it does not have:\n" + "\n".join(missing)


def test_no_file_points_at_notes_outside_the_repository():
    found = []
    for name in tracked_files():
        text = read_text(name)
        if text is None:
            continue
        found += [f"{name}:{line_of(text, text.find(note))}: {note}" for note in OUTSIDE_NOTES if note in text]
    assert not found, "these files cite notes that are not in the repository (cite docs/spec.md):\n" + "\n".join(found)


def test_bare_spec_citations_are_refused():
    found = [f"{name}:{line_of(text, m.start())}: {text[m.start():m.end() + 8]!r}"
             for name, text in source_texts().items() for m in BARE_SPEC.finditer(text)]
    assert not found, "cite the file and section, as 'docs/spec.md <section>':\n" + "\n".join(found)


def test_every_section_sign_belongs_to_a_spec_citation():
    # A lone "(<sign>8.3)" would leave the reader guessing which document it means.
    orphans = []
    for name, text in source_texts().items():
        if name == "docs/spec.md":
            continue  # its own cross-references are checked above
        covered = [match.span() for match in CITATION.finditer(text)]
        for index in (i for i, ch in enumerate(text) if ch == SECTION_SIGN):
            if not any(start <= index < end for start, end in covered):
                orphans.append(f"{name}:{line_of(text, index)}: {text[max(0, index - 30):index + 10]!r}")
    assert not orphans, "section signs outside a 'docs/spec.md <section>' citation:\n" + "\n".join(orphans)
