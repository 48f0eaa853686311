"""Print the README's set-up and test commands, one per line, so CI runs exactly what a reader runs.

The README's "Set up" section holds fenced bash blocks; the one that follows "Run a model" is the set-up
command, the one that follows "Run the tests" is the test command. A README without them fails here
instead of CI running something else.
"""

import re
import sys
from pathlib import Path


def commands(readme: str) -> dict[str, str]:
    found = {}
    for label, key in (("Run a model", "setup"), ("Run the tests", "test")):
        m = re.search(re.escape(label) + r"[^\n]*\n+```bash\n(.+?)\n```", readme, re.S)
        if m is None or "\n" in m.group(1).strip():
            raise SystemExit(
                f"README.md: no one-line bash block after {label!r}: keep the set-up commands there"
            )
        found[key] = m.group(1).strip()
    return found


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "README.md"
    print(commands(path.read_text())[sys.argv[2] if len(sys.argv) > 2 else "test"])
