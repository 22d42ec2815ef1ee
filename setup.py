"""Ships the scenario suite inside the wheel (metadata stays in pyproject.toml).

`pip install .` builds a wheel of the `harness` package; an installed `offload-bench list` or `bench` then needs
the scenario files and their pytest glue (scenarios/conftest.py, test_offload_matrix.py), and `advise` the
committed GPU records, which live beside the package in a checkout. build_py copies them to harness/_shipped in
the build tree, where harness.common.locations finds them. Editable installs run from the checkout and need no copy.
Data inside the package (the planner's plan_data.json, the stand-ins' sizes, the releases' recorded answers) is
package data (pyproject.toml).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED_SUFFIXES = (".toml", ".py")


class BuildPyWithScenarios(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        shipped = Path(self.build_lib) / "harness" / "_shipped"
        source = ROOT / "scenarios"
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts:
                self._ship(path, shipped / "scenarios" / path.relative_to(source))
        # the committed GPU records (3 MB), which `advise` takes its measured rows from (harness.common.locations)
        for path in sorted((ROOT / "results").glob("*/*.records.jsonl")):
            self._ship(path, shipped / "results" / path.relative_to(ROOT / "results"))

    def _ship(self, path: Path, target: Path) -> None:
        self.mkpath(str(target.parent))
        self.copy_file(str(path), str(target))


setup(cmdclass={"build_py": BuildPyWithScenarios})
