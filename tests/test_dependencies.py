"""What the project may install: no known-bad release admitted, and no required dependency skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]

# Releases of our dependencies, within the ranges a project like ours would declare, that must
# never be installed: (package, releases, why). Versions are the published ones the advisory covers.
ADVISORIES: list[tuple[str, list[str], str]] = [
    (
        "lightning",
        ["2.6.2", "2.6.3"],
        "GHSA-w37p-236h-pfx3: compromised on PyPI, a credential stealer that runs on import",
    ),
    ("pytorch-lightning", ["2.6.2", "2.6.3"], "GHSA-w37p-236h-pfx3 (the same compromise)"),
    (
        "lightning",
        ["2.6.0", "2.6.1", "2.6.4", "2.6.5"],
        "GHSA-qqmf-gpg7-g8gw / PYSEC-2026-3624: code execution through a checkpoint's hyperparameters; fixed in 2.6.6",
    ),
    (
        "pytorch-lightning",
        ["2.6.0", "2.6.1", "2.6.4", "2.6.5"],
        "PYSEC-2026-3967 (the same flaw); fixed in 2.6.6",
    ),
    (
        "hydra-core",
        ["1.3.2", "1.3.3"],
        "GHSA-2cp2-2r3c-7p7r: instantiate() of a config runs arbitrary code; blocklist from 1.3.4",
    ),
    (
        "wandb",
        ["0.22.0", "0.25.1", "0.28.0"],
        "CVE-2026-91771: path traversal in File.download; fixed in 0.29.0",
    ),
    (
        "onnx",
        ["1.17.0", "1.18.0", "1.19.1", "1.20.0", "1.21.0"],
        "GHSA-3r9x-f23j-gc73, GHSA-cmw6-hcpp-c6jp (path traversal), GHSA-hwpq-hmq9-wj77; fixed by 1.22.0",
    ),
    (
        "pytest",
        ["8.0.0", "8.4.2", "9.0.2"],
        "GHSA-6w46-j5rx-g56g: predictable temporary folders; fixed in 9.0.3",
    ),
]


def _requirements(pyproject: str) -> list[Requirement]:
    """Every requirement pyproject.toml declares: the dependencies and every extra's."""
    project = tomllib.loads(pyproject)["project"]
    declared = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    return [Requirement(r) for r in declared if not r.startswith(project["name"])]


def admitted_bad_releases(requirements: list[Requirement]) -> list[str]:
    """The known-bad releases that some requirement would let the resolver pick."""
    return [
        f"{req.name}=={version} ({why})"
        for req in requirements
        for package, versions, why in ADVISORIES
        if canonicalize_name(req.name) == canonicalize_name(package)
        for version in versions
        if req.specifier.contains(version, prereleases=True)
    ]


def test_pyproject_admits_no_known_bad_release() -> None:
    assert admitted_bad_releases(_requirements((REPO / "pyproject.toml").read_text())) == []


def test_the_previous_lightning_range_would_have_admitted_the_compromised_releases() -> None:
    """The check fails on what pyproject.toml said before the floor: lightning>=2.6,<2.7."""
    admitted = admitted_bad_releases([Requirement("lightning>=2.6,<2.7")])
    assert {"lightning==2.6.2", "lightning==2.6.3", "lightning==2.6.5"} <= {a.split(" ")[0] for a in admitted}


def test_every_package_lightning_pulls_in_is_floored_too() -> None:
    """lightning 2.6.6 requires pytorch-lightning without a floor: ours must name it."""
    names = {canonicalize_name(r.name) for r in _requirements((REPO / "pyproject.toml").read_text())}
    assert {"lightning", "pytorch-lightning", "scipy"} <= names


def test_constraints_pin_no_known_bad_release() -> None:
    pins = [
        Requirement(line)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert admitted_bad_releases(pins) == []
    # The pins are what the install step takes; every declared dependency has one.
    pinned = {canonicalize_name(p.name) for p in pins}
    declared = {canonicalize_name(r.name) for r in _requirements((REPO / "pyproject.toml").read_text())}
    assert declared - pinned <= {"flash-attn"}  # CUDA only, never installed on the CPU machines


CUDA_TEST = "tests/test_attention.py::test_sdpa_flash_kernel_runs_on_cuda_in_bf16"


@pytest.mark.processes
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without the dependency: here, CUDA")
def test_a_required_dependency_that_is_missing_fails_the_run_instead_of_skipping() -> None:
    """CUDA is the optional dependency missing on a CPU machine: its tests skip (as this run's
    summary shows), unless QATFLASH_REQUIRE names it, when they fail."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", CUDA_TEST],
        cwd=REPO,
        env={**os.environ, "QATFLASH_REQUIRE": "onnx,cuda"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "needs a CUDA GPU, which is missing, and QATFLASH_REQUIRE requires it" in proc.stdout


def test_an_unknown_required_name_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest

    monkeypatch.setenv("QATFLASH_REQUIRE", "onnx,onnxx")
    with pytest.raises(pytest.UsageError, match=r"QATFLASH_REQUIRE names \['onnxx'\]; it may name \["):
        conftest.pytest_configure(None)
