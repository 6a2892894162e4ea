"""Splice the hand-written findings (docs/quality-notes.md) into docs/QUALITY.md.

`kvembed-lab quality` embeds docs/quality-notes.md when it writes the page (the
notes are compiled into the binary). When only the notes change, this puts
them in place without re-running the study (hours on 2 cores): it replaces
everything from "## What the study covers" up to the first per-model section
("## <model file>" and its "<N> layers, hidden size" line), which the
command writes after the notes.

    python3 scripts/quality_notes.py [--check]

--check exits 1 (changing nothing) when the page's notes differ from the file.
"""
import re
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
page_path, notes_path = root / "docs/QUALITY.md", root / "docs/quality-notes.md"
page, notes = page_path.read_text(), notes_path.read_text()
if "## What the study covers" not in notes:
    sys.exit(f"{notes_path}: expected a '## What the study covers' heading")
start = page.find("## What the study covers")
if start < 0:
    sys.exit(f"{page_path}: no notes block; run `kvembed-lab quality` instead")
# The block ends at the first per-model section, which the command writes as
# "## <model file>" followed by "<N> layers, hidden size ...". Headings of
# older notes before it belong to the block, so renamed headings go too.
model = re.compile(r"^## .+\n\n\d+ layers, hidden size ", re.M)
m = model.search(page, start)
if m is None:
    sys.exit(f"{page_path}: no model section after the notes; run `kvembed-lab quality` instead")
end = m.start()
new = page[:start] + notes.rstrip() + "\n\n" + page[end:].lstrip("\n")
if "--check" in sys.argv[1:]:
    sys.exit(0 if new == page else f"{page_path}: notes differ from {notes_path} (run scripts/quality_notes.py)")
if new != page:
    page_path.write_text(new)
    print(f"updated {page_path}", file=sys.stderr)
