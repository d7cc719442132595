"""Print command line N (1-based) of the first fenced block after README's ``## Quick start`` heading.

Used by .ci/run, which runs line 2 (install the test extras and run the suite). Blank lines and ``#`` comments
are skipped, a leading ``$ `` prompt is dropped and backslash continuations are joined, so the README may be
written the way people write shell snippets. Exit 1 with a message when the section or the line is missing.
"""
import re
import sys


def quickstart_lines(text):
    section = re.search(r"^##\s+Quick start\s*$(.*?)(?=^##\s|\Z)", text, re.M | re.S | re.I)
    if not section:
        raise LookupError("README.md has no '## Quick start' section")
    block = re.search(r"^\s*(```|~~~)[^\n]*\n(.*?)^\s*\1", section.group(1), re.M | re.S)
    if not block:
        raise LookupError("the '## Quick start' section has no fenced code block")
    lines, pending = [], ""
    for raw in block.group(2).splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending and line.startswith("$ "):
            line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending.strip())
    return lines


def main(argv):
    number, path = int(argv[1]), argv[2] if len(argv) > 2 else "README.md"
    try:
        with open(path, encoding="utf-8") as handle:
            lines = quickstart_lines(handle.read())
    except (OSError, LookupError) as exc:
        print(f"quickstart: {path}: {exc}", file=sys.stderr)
        return 1
    if len(lines) < number:
        print(f"quickstart: {path}: the Quick start block has {len(lines)} command line(s), not {number}",
              file=sys.stderr)
        return 1
    print(lines[number - 1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
