"""Print a pip constraints file that pins every dependency of pyproject.toml to its lowest admitted release.

CI installs the project with these constraints in a fresh environment and runs the command line there, so a
lower bound that does not work fails CI instead of a user's install. A dependency without a lower bound is an
error: its lowest release would be whatever is oldest on PyPI, which nobody tested.
Usage: python3 .ci/lowest_constraints.py [pyproject.toml] > lowest.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(?P<spec>[^;]*)")


def lowest_pins(dependencies: list[str]) -> list[str]:
    pins = []
    for requirement in dependencies:
        match = REQUIREMENT.match(requirement.strip())
        if match is None:
            raise SystemExit(f"cannot read the requirement {requirement!r}")
        lower = re.search(r">=\s*([^,\s]+)", match["spec"])
        if lower is None:
            raise SystemExit(f"{match['name']} has no lower bound in pyproject.toml; give it one (>=X) that CI tests")
        pins.append(f"{match['name']}=={lower[1]}")
    return pins


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    project = tomllib.loads(path.read_text())["project"]
    print("\n".join(lowest_pins(project["dependencies"])))


if __name__ == "__main__":
    main()
