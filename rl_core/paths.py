"""Where Turnstile's shipped files live, relative to the source tree."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
DOMAINS_DIR = DATA_DIR / "domains"
