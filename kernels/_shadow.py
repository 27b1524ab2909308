"""What this folder does when imported as a top-level ``kernels`` instead of ``fastppo.kernels``.

That happens when the repository root is on ``sys.path`` (``python -c`` / ``python -m`` run from a
checkout). The name belongs to Hugging Face's ``kernels`` package, which transformers probes for
(importing it as a last resort). So step aside: load the real package in our place if one is
installed, else look like no installed package at all (no ``__file__``), which transformers reads
as "not available" instead of crashing on our code.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, namespace: dict) -> None:
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(namespace["__file__"])))
    search = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the importer receives the real package
        spec.loader.exec_module(module)
        return
    for key in ("__file__", "__path__"):
        namespace.pop(key, None)
    namespace["__doc__"] = (
        "placeholder: the repository's kernels/ folder is importable only as fastppo.kernels"
    )
