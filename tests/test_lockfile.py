"""requirements.lock, from which the Docker image installs with --require-hashes, stays in step
with pyproject.toml: every runtime dependency and the build backend pinned, within the ranges
pyproject.toml allows, each pin with its hashes. Regenerate it with the command in its header
(pip-tools' pip-compile) whenever pyproject.toml's dependencies change."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO

LOCK = REPO / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)")
COMMAND = (
    "pip-compile --all-build-deps --allow-unsafe --generate-hashes --no-emit-find-links "
    "--no-emit-index-url --output-file=requirements.lock --strip-extras pyproject.toml"
)


def pins() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, its sha256 hashes), from requirements.lock."""
    found: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            found[current] = (match.group(2), [])
        elif "--hash=sha256:" in line and current:
            found[current][1].append(line.split("--hash=sha256:", 1)[1].rstrip(" \\"))
    return found


def declared() -> list[Requirement]:
    """pyproject.toml's runtime dependencies and build-system requirements."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    texts = project["project"]["dependencies"] + project["build-system"]["requires"]
    return [Requirement(text) for text in texts]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    """Each dependency and build requirement of pyproject.toml has a pin in requirements.lock
    that its version specifier allows (a changed range without a new lock fails here)."""
    locked = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in requirements.lock"
        version = locked[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside pyproject.toml's {requirement}"
        )


def test_every_pin_has_hashes_and_the_lock_says_how_it_was_made() -> None:
    """Every pin carries sha256 hashes (pip --require-hashes refuses a pin without), and the
    header names the command that regenerates the lock."""
    locked = pins()
    assert locked
    for name, (_, hashes) in locked.items():
        assert hashes, f"{name} has no hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    assert f"#    {COMMAND}\n" in LOCK.read_text(encoding="utf-8")


def test_the_docker_image_installs_from_the_lock_with_hashes() -> None:
    """The Dockerfile installs the dependencies from requirements.lock with --require-hashes
    and the project itself without resolving or downloading anything more."""
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "--require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "--no-deps --no-build-isolation --no-index ." in dockerfile
