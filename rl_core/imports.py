"""Loading user code named as 'package.module:attribute' (environments, scorers)."""

from __future__ import annotations

import importlib
from typing import Any


def import_from_path(spec: str, what: str, form: str = "package.module:name", kind: str = "attribute") -> Any:
    """The attribute `spec` names. Raises ValueError naming `what` it was for and what is wrong:
    a malformed spec, a module that does not import, or a missing attribute."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"{what} {spec!r} must look like '{form}'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({err})") from err
    if not hasattr(module, name):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no {kind} {name!r}")
    return getattr(module, name)
