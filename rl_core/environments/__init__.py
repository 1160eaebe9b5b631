"""Environments: the interface (base.py), built-in SOP domains (sop.py) and their expert (expert.py), and
SOP-Bench-format folders (sopbench.py).

`load_environment(name)` turns a config entry into an Environment: "sopbench:<folder>" is a domain
folder in the SOP-Bench benchmark's layout (its only keyword argument: heldout_fraction); a
"package.module:Class" path is imported and instantiated with the keyword arguments (a user's own
environment, no Turnstile edits needed); any other name is a built-in SOP domain folder under
`domains_dir` (default: the shipped data/domains). `check_environment` checks the same without
building anything (the class imports and its constructor accepts the arguments; an SOP-Bench-format
folder is read and checked, its tools.py imported), so a config can be checked when it is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rl_core.environments.base import Environment, EnvSession, StepResult, Task
from rl_core.environments.sop import SOPDomain, SOPEnvironment
from rl_core.environments.sopbench import SOPBenchDomain, SOPBenchEnvironment, is_sopbench, load_sopbench
from rl_core.imports import import_from_path
from rl_core.paths import DOMAINS_DIR

__all__ = [
    "EnvSession",
    "Environment",
    "SOPBenchDomain",
    "SOPBenchEnvironment",
    "SOPDomain",
    "SOPEnvironment",
    "StepResult",
    "Task",
    "available_domains",
    "check_environment",
    "load_environment",
]


def available_domains(domains_dir: Path | None = None) -> list[str]:
    """Names of the SOP domain folders (those holding a domain.json), sorted."""
    root = Path(domains_dir) if domains_dir is not None else DOMAINS_DIR
    if not root.is_dir():
        return []
    return sorted(child.name for child in root.iterdir() if (child / "domain.json").is_file())


def load_environment(name: str, /, domains_dir: Path | None = None, **kwargs: Any) -> Environment:
    """Build the environment `name`: "sopbench:<folder>", "package.module:Class" (with **kwargs) or a built-in
    domain.

    `kwargs` go to class-path environments and SOP-Bench-format folders (heldout_fraction only); built-in
    domains take none and ignore them, so one config may list both. `name` is positional-only, so a class's
    own `name` argument passes through `kwargs` (a constructor argument called `domains_dir` does not: it is
    this function's). Raises ValueError naming the class path, the SOP-Bench folder and its missing or
    invalid file, or listing the available domains.
    """
    if is_sopbench(name):
        return load_sopbench(name, kwargs)
    if ":" in name:
        return _load_class(name)(**kwargs)
    return SOPEnvironment(_domain_folder(name, domains_dir))


def _domain_folder(name: str, domains_dir: str | Path | None) -> Path:
    """The folder of built-in domain `name` under `domains_dir` (default: the shipped domains).

    Raises ValueError listing the available domains when there is none of that name."""
    root = Path(domains_dir) if domains_dir is not None else DOMAINS_DIR
    available = available_domains(root)
    if name not in available:
        raise ValueError(
            f"unknown environment {name!r}: available domains in {root} are {available}; a class of your "
            "own is given as 'package.module:ClassName', an SOP-Bench-format folder as 'sopbench:/path/to/folder'"
        )
    return root / name


def check_environment(name: str, kwargs: Mapping[str, Any] | None = None, domains_dir: Path | None = None) -> None:
    """Check that `load_environment(name, domains_dir, **kwargs)` can build, without building it.

    A class path must import, name an Environment subclass that is not abstract (it implements
    every abstract method, so it can be instantiated), and its constructor must accept
    `kwargs` (bound against `inspect.signature` of the class: unknown and missing arguments
    are both caught; what the constructor itself does is not run); no argument may be called
    `domains_dir`, which load_environment keeps for itself. A domain name must exist
    under `domains_dir` and, given explicitly with arguments, is refused: built-in domains
    take none. A "sopbench:<folder>" entry is loaded (`load_sopbench`: the folder's files are read
    and checked, tools.py imported and its manager class found and made once; only heldout_fraction and
    max_observation_chars are accepted).
    Raises ValueError saying what is wrong.
    """
    kwargs = dict(kwargs or {})
    if is_sopbench(name):
        load_sopbench(name, kwargs)
        return
    if ":" not in name:
        _domain_folder(name, domains_dir)
        if kwargs:
            raise ValueError(f"built-in domain {name!r} takes no keyword arguments, got {sorted(kwargs)}")
        return
    cls = _load_class(name)
    if "domains_dir" in kwargs:
        raise ValueError(
            "the keyword argument 'domains_dir' cannot reach an environment class (load_environment takes "
            "it for built-in domains); give the constructor parameter another name"
        )
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise ValueError(f"{cls.__name__} is abstract: it does not implement {missing}, so it cannot be instantiated")
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no introspectable constructor: nothing to check it against
        return
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"{cls.__name__}{signature} does not accept the keyword arguments {kwargs}: {err}") from None


def _load_class(spec: str) -> type[Environment]:
    class_name = spec.partition(":")[2]
    cls = import_from_path(spec, "environment class path", form="package.module:ClassName")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(
            f"environment class path {spec!r}: {class_name} is not a subclass of rl_core.environments.base.Environment"
        )
    return cls
