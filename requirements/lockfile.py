"""The tested dependency set: write it, check an environment against it, say what moved.

    python requirements/lockfile.py freeze > requirements/lock.txt   # the environment this runs in, as a lock
    python requirements/lockfile.py check requirements/lock.txt      # exit 1 when an installed version differs
    python requirements/lockfile.py moved requirements/lock.txt      # what a fresh resolve installed beyond the lock
    python requirements/lockfile.py unbounded                         # pyproject's dependencies without versions

torch is left out on purpose: the Makefile installs it first (`torch==$(TORCH_VERSION)`), the CPU wheel on a CPU
machine and a CUDA build on a GPU machine, which also pull different helper packages (nvidia-*, triton). The lock is
used as pip *constraints* (`pip install -c`), so packages that only one platform needs stay free.
Standard library only: it runs in any interpreter, before anything else is installed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# not locked: torch and what only its platform build pulls in, the project itself, and the installer's own tools
UNLOCKED = {"torch", "triton", "difftune", "pip", "setuptools", "wheel"}
UNLOCKED_PREFIXES = ("nvidia-",)

HEADER = """\
# The tested dependency set: every package `make install` puts beside torch, pinned with ==.
# Written by `make upgrade` (requirements/lockfile.py freeze) after a fresh resolve; `make test` must pass with it
# before it is committed. Installed as constraints: pip install -c requirements/lock.txt -e ".[dev,app]".
# torch is not here: the Makefile pins it (TORCH_VERSION) so that CPU and CUDA builds both fit.
"""


def canonical(name: str) -> str:
    """PEP 503 normalised project name: 'PyYAML' and 'pyyaml', 'typing_extensions' and 'typing-extensions' match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(name: str) -> bool:
    name = canonical(name)
    return name not in UNLOCKED and not name.startswith(UNLOCKED_PREFIXES)


def installed() -> dict[str, tuple[str, str]]:
    """canonical name -> (name as published, version) of every distribution in this interpreter's environment."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = (name, dist.version)
    return found


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" not in line:
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {line!r}")
        name, version = (part.strip() for part in line.split("==", 1))
        pins[canonical(name)] = (name, version)
    return pins


def freeze() -> str:
    rows = sorted((name, version) for key, (name, version) in installed().items() if locked(key))
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(rows, key=lambda r: canonical(r[0])))


def differences(pins: dict, present: dict) -> list[str]:
    """One line per package whose installed version is not the pinned one (or that is missing)."""
    lines = []
    for key, (name, version) in sorted(pins.items()):
        have = present.get(key)
        if have is None:
            lines.append(f"{name}: locked {version}, not installed")
        elif have[1].split("+")[0] != version.split("+")[0]:
            lines.append(f"{name}: locked {version}, installed {have[1]}")
    return lines


def unbounded(pyproject: Path, extras: tuple[str, ...] = ("dev", "app")) -> list[str]:
    """The project's direct dependencies (and the given extras') by name only, torch left out: what `make
    test-latest` installs to meet the newest releases, past the upper bounds pyproject.toml sets for known breaks."""
    text = pyproject.read_text()
    blocks = [re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)]
    blocks += [re.search(rf"^{extra} = \[(.*?)\]", text, re.S | re.M) for extra in extras]
    names = []
    for block in blocks:
        if block is None:
            continue
        for requirement in re.findall(r'"([^"]+)"', block.group(1)):
            name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
            if locked(name) and name not in names:
                names.append(name)
    return names


def main(argv: list[str]) -> int:
    if argv and argv[0] == "unbounded":
        print(" ".join(unbounded(Path(__file__).resolve().parent.parent / "pyproject.toml")))
        return 0
    if not argv or argv[0] not in ("freeze", "check", "moved"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "freeze":
        sys.stdout.write(freeze())
        return 0
    lock_path = Path(argv[1] if len(argv) > 1 else Path(__file__).with_name("lock.txt"))
    pins, present = read_lock(lock_path), installed()
    if argv[0] == "check":
        problems = differences(pins, present)
        for line in problems:
            print(f"lock: {line}", file=sys.stderr)
        if problems:
            print(
                f"lock: this environment does not match {lock_path}; run `make install` to reinstall it",
                file=sys.stderr,
            )
            return 1
        print(f"lock: all {len(pins)} locked packages installed at their locked versions")
        return 0
    # moved: a resolve without the lock, compared with it (what `make test-latest` tests beyond the tested set)
    moved = differences(pins, present)
    new = sorted(name for key, (name, _) in present.items() if locked(key) and key not in pins)
    print(f"newest releases against {lock_path}: {len(moved)} moved, {len(new)} new")
    for line in moved:
        print(f"  {line}")
    for name in new:
        print(f"  {name}: not in the lock, installed {present[canonical(name)][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
