"""The documentation site builds with ``mkdocs build --strict`` (what ``make docs`` runs).

A broken link, a missing page in the nav or an API reference that cannot be collected fails the
build. MathJax is referenced by URL only (``extra_javascript``), so the build needs no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the whole mkdocs build (~10 s): in `make test`, not in `make test-fast`
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_site_builds_strict_with_every_page(site: Path) -> None:
    assert (site / "index.html").is_file()
    for page in ("concepts", "samplers/smc", "theory", "verify_report", "api/core", "api/theory"):
        assert (site / page / "index.html").is_file(), page
    assert (site / "figures/verify/h_smc_evidence.png").is_file()


@pytest.mark.slow
def test_api_pages_render_docstrings_and_math(site: Path) -> None:
    core = (site / "api/core/index.html").read_text(encoding="utf-8")
    assert 'id="tiltsample.driver.sample"' in core  # tiltsample.sample's reference
    assert 'id="tiltsample.results.ChainTrace.to_inference_data"' in core
    assert 'class="arithmatex"' in core  # the .. math:: block of tiltsample.target
    assert ".. math::" not in core and ":class:`" not in core
    smc = (site / "api/samplers/smc/index.html").read_text(encoding="utf-8")
    assert 'id="tiltsample.samplers.smc"' in smc  # a mapped folder (samplers/) is documented
    assert 'class="arithmatex"' in smc
    assert "mathjax" in smc.lower()
