"""The Docker images install exactly what the lock file pins, as the Makefile does.

Docker cannot run on the project's machines, so this reads the Dockerfiles: every pip install in
them comes from requirements.lock (or installs foldship itself under it as constraints), and the
pins in pyproject.toml agree with the lock.
"""
import re
import shlex
import tomllib

import pytest

from .conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.tensorrt"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            match = PIN.match(line)
            assert match, f"requirements.lock line is not an exact pin: {line!r}"
            pins[normalise(match[1])] = match[2]
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def run_commands(dockerfile: str) -> list[str]:
    """Each shell command of each RUN instruction (continuation lines joined, split at &&)."""
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    runs = [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]
    return [part.strip() for run in runs for part in run.split("&&")]


def pip_installs(dockerfile: str) -> list[tuple[list[str], dict[str, str], set[str]]]:
    """(requirement arguments, {-r/-c: file}, other options) of every pip install in the Dockerfile."""
    found = []
    for command in run_commands(dockerfile):
        words = shlex.split(command)
        if words[:2] != ["pip", "install"]:
            continue
        requirements, files, options, rest = [], {}, set(), iter(words[2:])
        for word in rest:
            if word in ("-r", "-c"):
                files[word] = next(rest)
            elif word.startswith("-"):
                options.add(word)
            else:
                requirements.append(word)
        found.append((requirements, files, options))
    return found


def test_pyproject_pins_agree_with_the_lock():
    pins = lock()
    project = pyproject()
    extras = project["optional-dependencies"]
    for requirement in project["dependencies"] + [r for name, group in extras.items() if name != "trt" for r in group]:
        name, version = PIN.match(requirement).groups()
        assert pins.get(normalise(name)) == version, f"{requirement} in pyproject.toml, lock has {pins.get(normalise(name))}"
    assert extras["trt"] and all(PIN.match(r) for r in extras["trt"])  # TensorRT: pinned, GPU images only


def test_makefile_installs_the_lock():
    assert "pip install --quiet --disable-pip-version-check -r requirements.lock" in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_only_what_the_lock_pins(dockerfile):
    installs = pip_installs(dockerfile)
    assert installs[0][:2] == ([], {"-r": "requirements.lock"})  # everything pinned comes first, from the lock
    for requirements, files, options in installs[1:]:
        assert requirements in (["."], [".[trt]"])  # then foldship itself, never a package by name,
        assert files == {"-c": "requirements.lock"} or "--no-deps" in options  # adding nothing unpinned
    text = (ROOT / dockerfile).read_text()
    assert "COPY requirements.lock ./" in text
    pins = lock()
    for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\"';&]*)", text):
        assert pins.get(normalise(name)) == version, f"{dockerfile} pins {name}=={version}"


def test_tensorrt_image_is_nvidias_with_the_trt_extra():
    text = (ROOT / "docker/Dockerfile.tensorrt").read_text()
    base = re.search(r"^ARG TRT_IMAGE=(\S+)$", text, re.MULTILINE)[1]
    repository, tag = base.rsplit(":", 1)
    assert repository == "nvcr.io/nvidia/tensorrt" and tag not in ("", "latest")
    assert "FROM ${TRT_IMAGE}" in text
    assert ([".[trt]"], {"-c": "requirements.lock"}) in [i[:2] for i in pip_installs("docker/Dockerfile.tensorrt")]
