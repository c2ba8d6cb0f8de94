"""Checks what ``make wheel`` and ``make pytest-pythons`` produce (not a pytest module).

``check_dist.py sdist FILE.tar.gz``
    the sdist holds what a build from it needs;
``check_dist.py installed``
    (run from outside the source tree) the ``warden`` imported is an installed
    wheel, not the source tree, and it runs tasks.
"""

from __future__ import annotations

import asyncio
import sys
import tarfile
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent

NEEDED_IN_SDIST = (
    "pyproject.toml",
    "Cargo.toml",
    "Cargo.lock",
    "crates/warden/Cargo.toml",
    "crates/warden/src/lib.rs",
    "crates/warden-py/Cargo.toml",
    "crates/warden-py/src/lib.rs",
    "python/warden/__init__.py",
    "python/warden/_warden.pyi",
    "python/warden/py.typed",
)


def check_sdist(path: str) -> None:
    with tarfile.open(path) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [name for name in NEEDED_IN_SDIST if name not in names]
    if missing:
        sys.exit(f"{path}: missing {missing}")
    print(f"sdist OK: {Path(path).name} ({len(names)} files)")


async def run_one(ex: object) -> int:
    return await ex.run(pow, 3, 4)  # type: ignore[attr-defined]


def check_installed() -> None:
    import warden
    import warden._warden as ext

    where = Path(warden.__file__).resolve()
    if TREE / "python" in where.parents or "site-packages" not in where.parts:
        sys.exit(f"warden was imported from the source tree ({where}), not from an installed wheel")
    if not Path(ext.__file__).name.endswith(".abi3.so"):
        sys.exit(f"the extension is not the abi3 build: {ext.__file__}")
    with warden.ProcessPoolExecutor(2) as ex:
        assert ex.submit(pow, 2, 10).result() == 1024
        assert asyncio.run(run_one(ex)) == 81
    with warden.Pool(1) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]
    print(f"installed wheel OK: CPython {sys.version.split()[0]}, {where.parent}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sdist"] and len(sys.argv) == 3:
        check_sdist(sys.argv[2])
    elif sys.argv[1:] == ["installed"]:
        check_installed()
    else:
        sys.exit(__doc__)
