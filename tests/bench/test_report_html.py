"""The report's HTML page renders in a real headless browser (Debian's chromium), offline.

Without chromium the test skips, saying so, unless ``SAMKIT_INSTALL_CHROMIUM=1`` is set: then
it installs chromium with apt-get (as root, from a package mirror: 26 s for the package and
its ~120 dependencies here, plus 14 s for ``apt-get update`` on a machine without package
lists). CI sets it (``.ci/run``). The screenshot must show the page: mostly white, with the
dark pixels of text and the colours of the figures.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from samkit.bench import write_report
from tests.bench.test_report import _fake_sweep

#: Set to 1 to let the test install chromium with apt-get when it is missing (CI does).
INSTALL_VARIABLE = "SAMKIT_INSTALL_CHROMIUM"

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--hide-scrollbars",
    "--window-size=1200,2400",
]  # fmt: skip


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get(INSTALL_VARIABLE) != "1":
        pytest.skip(
            f"chromium is not installed; set {INSTALL_VARIABLE}=1 to let this test install it "
            "with apt-get (as root)"
        )
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            f"chromium is not installed and {INSTALL_VARIABLE}=1 cannot install it "
            "(needs root and apt-get)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        res = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
        if res.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300, env=env)
            res = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"chromium could not be installed: {e}")
    path = shutil.which("chromium")
    if res.returncode != 0 or not path:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"chromium could not be installed: {tail[0]}")
    return path


@pytest.mark.slow
def test_the_html_report_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    chromium = _chromium()
    _fake_sweep(tmp_path)
    page = write_report(tmp_path)["html"]
    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HOME": str(tmp_path)},  # a profile of its own
    )  # fmt: skip
    assert shot.is_file(), res.stderr[-2000:]
    img = imread(shot)[..., :3]  # float RGB in [0, 1]
    assert img.shape[0] >= 2000 and img.shape[1] >= 1100
    white = (img.min(axis=2) > 0.95).mean()
    dark = (img.max(axis=2) < 0.3).mean()
    coloured = ((img.max(axis=2) - img.min(axis=2)) > 0.3).mean()
    assert white > 0.5, "the page did not render (not mostly white)"
    assert dark > 0.002, "no text drawn"
    assert coloured > 0.001, "no figure drawn (the embedded PNGs did not load)"


def test_without_chromium_it_skips_unless_allowed_to_install(monkeypatch):
    def no_install(*args, **kwargs):
        raise AssertionError(f"would run {args[0]}")

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(subprocess, "run", no_install)
    monkeypatch.delenv(INSTALL_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"set {INSTALL_VARIABLE}=1 to let"):
        _chromium()
    monkeypatch.setenv(INSTALL_VARIABLE, "1")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root and apt-get"):
        _chromium()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: "/usr/bin/apt-get" if name == "apt-get" else None
    )
    with pytest.raises(AssertionError, match="would run .*apt-get"):  # allowed: it installs
        _chromium()
