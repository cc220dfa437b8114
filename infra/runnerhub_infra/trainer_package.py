"""The trainer Lambda's package: its code (forecast/ and chalicelib/) and one layer of its
dependencies (requirements-trainer.txt: scikit-learn, numpy, scipy, joblib, threadpoolctl and
what chalicelib needs), unpacked from manylinux x86_64 CPython 3.11 wheels.

Lambda counts the function's code and all its layers unzipped against one quota
(LAMBDA_UNZIPPED_LIMIT); tests/infra/test_trainer_function.py measures both as built here.
The libraries' own test suites are left out of the layer (about 30 MB nothing imports).

The wheels come from a wheelhouse (`make wheelhouse-trainer`, `.cache/wheelhouse-trainer`, or
RUNNERHUB_TRAINER_WHEELHOUSE); a synth without one fills it with pip, as Chalice's packaging
pulls the app's wheels. The layer's zip is cached by the wheels it holds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from runnerhub_infra.stages import REPO_ROOT

# Lambda quotas: "Deployment package (.zip file archive) size: 250 MB (unzipped)", the function
# and all its layers together (https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html).
LAMBDA_UNZIPPED_LIMIT = 262_144_000
REQUIREMENTS = REPO_ROOT / "requirements-trainer.txt"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
DEFAULT_WHEELHOUSE = REPO_ROOT / ".cache" / "wheelhouse-trainer"
LAYER_CACHE = REPO_ROOT / ".cache" / "trainer-layer"
# Directories no import needs: the libraries' test suites and byte code (Lambda compiles).
STRIPPED_DIRS = frozenset({"tests", "__pycache__"})
# The code: the trainer and the modules it imports (chalicelib carries the pools files).
CODE_PACKAGES = ("forecast", "chalicelib")
PIP_PLATFORM = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--implementation", "cp", "--python-version", "3.11", "--abi", "cp311"]


def wheelhouse() -> Path:
    return Path(os.environ.get("RUNNERHUB_TRAINER_WHEELHOUSE", DEFAULT_WHEELHOUSE))


def ensure_wheelhouse(path: Path | None = None) -> Path:
    """The wheelhouse, filled with pip when it holds no wheel yet."""
    path = path or wheelhouse()
    if not any(path.glob("*.whl")):
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                        "--disable-pip-version-check", *PIP_PLATFORM, "-d", str(path),
                        "-c", str(CONSTRAINTS), "-r", str(REQUIREMENTS)], check=True)
    return path


def _wheels(path: Path) -> list[Path]:
    wheels = sorted(path.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {path} (make wheelhouse-trainer)")
    return wheels


def layer_key(path: Path) -> str:
    digest = hashlib.sha256()
    for wheel in _wheels(path):
        digest.update(f"{wheel.name}:{wheel.stat().st_size}\n".encode())
    digest.update(",".join(sorted(STRIPPED_DIRS)).encode())
    return digest.hexdigest()[:16]


def _stripped(name: str) -> bool:
    return any(part in STRIPPED_DIRS for part in Path(name).parts[:-1])


def build_layer(path: Path | None = None, cache: Path = LAYER_CACHE) -> Path:
    """The layer's zip (python/<packages>), built once per set of wheels."""
    path = ensure_wheelhouse(path)
    target = cache / f"trainer-layer-{layer_key(path)}.zip"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".partial", delete=False) as partial:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as layer:
            for wheel in _wheels(path):
                with zipfile.ZipFile(wheel) as source:
                    for info in source.infolist():
                        if info.is_dir() or _stripped(info.filename):
                            continue
                        entry = zipfile.ZipInfo(f"python/{info.filename}", info.date_time)
                        # Keep the mode bits (shared libraries stay executable).
                        entry.external_attr = info.external_attr or (0o644 << 16)
                        entry.compress_type = zipfile.ZIP_DEFLATED
                        layer.writestr(entry, source.read(info))
    os.replace(partial.name, target)  # whole or not at all
    return target


def build_code(out: Path) -> Path:
    """The function's code directory: the packages the trainer imports, no byte code."""
    shutil.rmtree(out, ignore_errors=True)
    for package in CODE_PACKAGES:
        shutil.copytree(REPO_ROOT / package, out / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def unzipped_bytes(archive: Path) -> int:
    with zipfile.ZipFile(archive) as found:
        return sum(info.file_size for info in found.infolist())


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
