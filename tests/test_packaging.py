"""The project's pins: one list of exact versions, mirrored by environment.yml."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(lines):
    return {line.strip() for line in lines if re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", line.strip())}


def test_environment_yml_mirrors_requirements_lock():
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    conda = _pins(line.strip().removeprefix("- ") for line in (ROOT / "environment.yml").read_text().splitlines())
    assert lock, "requirements.lock has no pins"
    assert conda == lock, f"only in environment.yml: {sorted(conda - lock)}; only in requirements.lock: {sorted(lock - conda)}"


def test_every_direct_dependency_is_pinned():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = {pin.split("==")[0].lower().replace("_", "-") for pin in _pins((ROOT / "requirements.lock").read_text().splitlines())}
    direct = project["dependencies"] + project["optional-dependencies"]["dev"]
    missing = [name for name in direct if re.split(r"[<>=\[ ]", name)[0].lower().replace("_", "-") not in lock]
    assert not missing, f"add exact pins for {missing} to requirements.lock"
