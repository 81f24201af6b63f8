"""OpenAI's reference implementation (the ``openai-clip`` distribution) loaded for parity tests.

``import clip`` fails on current setuptools (it imports ``pkg_resources``), so its self-contained
``model.py`` is loaded by file path instead.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path


@functools.cache
def openai_clip_module(name: str):
    """``clip/<name>.py`` of the installed openai-clip package, imported on its own."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the openai-clip package is not installed (pip install --no-deps openai-clip==1.0.1)")
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
