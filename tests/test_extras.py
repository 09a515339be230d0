"""Optional dependencies: one line naming the extra when a package is missing; the core imports without them.

A missing package is a real import failure here: ``sys.modules[name] = None`` makes Python's import raise
``ModuleNotFoundError`` for it, as in an environment where it was never installed.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from medfoundry.extras import EXTRAS, MissingExtraError, require

REPO_ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"openslide": "wsi", "wsidicom": "wsi", "transformers": "vlm", "tokenizers": "vlm"}
OPTIONAL |= {"sksurv": "survival", "torchstain": "stain", "peft": "lora"}


def _optional_dependencies() -> dict[str, list[str]]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requirements}


def test_every_extra_is_in_pyproject_with_its_packages() -> None:
    declared = _optional_dependencies()
    for extra, packages in EXTRAS.items():
        assert extra in declared, extra
        assert _names(declared[extra]) == set(packages), extra
    assert set(declared["all"][0].split("[")[1].rstrip("]").split(",")) == set(EXTRAS)
    core = _names(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert not core & {p for packages in EXTRAS.values() for p in packages}


@pytest.mark.parametrize(("module", "extra"), sorted(OPTIONAL.items()))
def test_a_missing_package_is_one_line_naming_its_extra(
    module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError) as info:
        require(module, extra)
    message = str(info.value)
    assert "\n" not in message and f"pip install 'medfoundry[{extra}]'" in message, message
    assert message.split("[")[1].split("]")[0] in _optional_dependencies()


def test_the_stain_normaliser_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from medfoundry.transforms.stain import MacenkoNormalizer

    for name in [m for m in sys.modules if m == "torchstain" or m.startswith("torchstain.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchstain", None)
    tile = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(MissingExtraError, match=r"medfoundry\[stain\]"):
        MacenkoNormalizer().fit(tile)


def test_a_broken_install_keeps_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The package is there but one of its own imports fails: not an "install the extra" message.
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import its_dependency_is_gone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "its_dependency_is_gone", None)
    with pytest.raises(ModuleNotFoundError, match="its_dependency_is_gone"):
        require("half_installed", "stain")


def test_core_and_cli_help_work_without_any_optional_package() -> None:
    blocked = sorted(OPTIONAL)
    code = (
        f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
        "import medfoundry, medfoundry.transforms.stain, medfoundry.vlm.text, medfoundry.bench.survival\n"
        "import medfoundry.wsi.embedding, medfoundry.wsi.interop\n"
        "from medfoundry.cli import main\n"
        "sys.argv = ['medfoundry', '--help']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wsi" in result.stdout
