"""Replay the recorded mutations: apply each patch, run the tests it names, report caught or survived.

Each `M<nn>-<name>.patch` here is one deliberate break of a feature, written as `git diff` output
after a header of `#` lines: the first says what breaks, and each `# test: <pytest node id>` line
names a test that must fail with it. A mutation is caught when its tests fail (pytest exit 1) and
survives when they pass; its tests must pass on the unpatched tree first, or a failure would prove
nothing. Patches are applied to the working tree and always reverted, so run this on a clean tree.

    make mutants                  # every patch
    make mutants MUTANTS=M04      # the patches whose names start with M04
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEST = "# test:"


@dataclass(frozen=True)
class Mutation:
    path: Path
    summary: str
    tests: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> Mutation:
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        tests = tuple(line[len(TEST) :].strip() for line in header if line.startswith(TEST))
        if not header or not tests:
            raise SystemExit(
                f"{path.name}: needs a '# <what breaks>' line and at least one '{TEST} <node id>' line"
            )
        return cls(path, header[0].lstrip("# ").strip(), tests)


def pytest(tests: tuple[str, ...]) -> int:
    """pytest's exit status for `tests`, markers ignored (a mutation's test may be an e2e one)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def git_apply(path: Path, *flags: str) -> None:
    subprocess.run(["git", "apply", *flags, str(path)], cwd=ROOT, check=True)


def verdict(mutation: Mutation) -> str:
    git_apply(mutation.path, "--check")
    git_apply(mutation.path)
    try:
        status = pytest(mutation.tests)
    finally:
        git_apply(mutation.path, "-R")
    return {0: "SURVIVED", 1: "caught"}.get(status, f"error (pytest exit {status})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", nargs="?", default="M", help="run the patches whose names start with this")
    args = parser.parse_args()
    mutations = [Mutation.read(p) for p in sorted(HERE.glob(f"{args.prefix}*.patch"))]
    if not mutations:
        raise SystemExit(f"no patch in {HERE} starts with {args.prefix!r}")
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    if pytest(tests) != 0:
        raise SystemExit(f"the named tests do not pass on the unpatched tree: {' '.join(tests)}")
    caught = 0
    for mutation in mutations:
        start = time.monotonic()
        result = verdict(mutation)
        caught += result == "caught"
        print(
            f"{mutation.path.stem:<40} {result:<22} {time.monotonic() - start:5.1f} s  {mutation.summary}",
            flush=True,
        )
    print(f"{caught}/{len(mutations)} caught")
    return 0 if caught == len(mutations) else 1


if __name__ == "__main__":
    sys.exit(main())
