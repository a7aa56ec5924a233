"""A wheel carries every sub-package: pyproject lists packages by hand, and a
package missing there works in an editable checkout but not when installed
(eagle3_mlx.tuning was missing, so an installed `bench`/`calibrate` failed)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {name: ROOT / path for name, path in cfg["package-dir"].items()}
    found = {".".join((name,) + init.parent.relative_to(base).parts)
             for name, base in dirs.items() for init in base.rglob("__init__.py")}
    assert found - listed == set(), f"not installed by pyproject [tool.setuptools] packages: {sorted(found - listed)}"
