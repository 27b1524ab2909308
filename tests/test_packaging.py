"""The package layout promise: kernels/ is `fastppo.kernels`, never a top-level `kernels`."""

import pathlib
import subprocess
import sys

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "fastppo." + ".".join(p.parent.relative_to(ROOT / "fastppo").parts)
        for p in (ROOT / "fastppo").rglob("__init__.py")
    }
    found = {name.rstrip(".") for name in found}
    found |= {
        "fastppo.kernels" + "".join("." + part for part in p.parent.relative_to(ROOT / "kernels").parts)
        for p in (ROOT / "kernels").rglob("__init__.py")
    }
    found |= {
        "fastppo.benchmarks" + "".join("." + part for part in p.parent.relative_to(ROOT / "benchmarks").parts)
        for p in (ROOT / "benchmarks").rglob("__init__.py")
    }
    assert found == listed


def test_kernels_is_only_importable_as_fastppo_kernels(tmp_path):
    code = (
        "import importlib.util, fastppo.kernels as k; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(k.__name__, None if spec is None else spec.origin)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    name, origin = out.stdout.split()
    assert name == "fastppo.kernels"
    # Either no top-level `kernels` at all, or Hugging Face's: never our folder.
    assert origin == "None" or not origin.startswith(str(ROOT / "kernels"))


@pytest.mark.slow  # a subprocess importing trl
def test_repository_root_on_sys_path_does_not_shadow_hugging_face_kernels():
    # `python -c` from the checkout puts the root first on sys.path; transformers then probes
    # `kernels` and must not import our folder's code (nor crash), and trl must import.
    code = (
        "import kernels, transformers.utils.import_utils as iu; "
        "from trl.trainer.utils import selective_log_softmax; "
        "print(getattr(kernels, '__file__', None), hasattr(kernels, 'token_logprobs'), "
        "iu.is_kernels_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    origin, has_ours, _ = out.stdout.split()
    assert has_ours == "False"
    assert origin == "None" or not origin.startswith(str(ROOT / "kernels"))
