"""Every gallery script (examples/plot_*.py) runs at its small size and exits 0.

Each script asserts its own correctness check (a dense or exact comparison), so a wrong answer
fails here, not only a crash. Scripts run in a subprocess with a timeout (they compile kernels,
fork threads and import peers); pictures and tables go to a temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(EXAMPLES.glob("plot_*.py"))
SKIP_EXIT_CODE = 77  # examples/_gallery.py's need(): a package the example cannot do without
TIMEOUT_S = 120  # per script; the small size takes a few seconds on a quiet 2-core machine


def test_gallery_has_scripts():
    assert SCRIPTS, f"no examples/plot_*.py in {EXAMPLES}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_gallery_script_small(script: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    env = dict(os.environ)
    env["LAZYMAT_GALLERY_SIZE"] = "small"
    env["LAZYMAT_GALLERY_OUTPUT"] = str(tmp_path)
    env["MPLBACKEND"] = "Agg"
    env.setdefault("OMP_NUM_THREADS", "1")  # small sizes; pytest-xdist runs scripts side by side
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script.name} did not finish in {TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    if proc.returncode == SKIP_EXIT_CODE:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "skipped")
    assert proc.returncode == 0, (f"{script.name} exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    assert any(tmp_path.iterdir()), f"{script.name} wrote no table or picture"


def test_collect_gathers_each_scripts_tables(tmp_path: Path, monkeypatch):
    """``make gallery``'s last step: every script's markdown tables under its title."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("LAZYMAT_GALLERY_OUTPUT", str(tmp_path / "output"))
    import _gallery

    script = SCRIPTS[0]
    monkeypatch.setattr(_gallery, "_script_name", lambda: script.stem)
    _gallery.print_table("demo table", [{"method": "lazymat", "seconds": 0.1, "error": 1e-7},
                                        {"method": "peer", "seconds": 0.3, "error": 0.0}])
    out = _gallery.collect(tmp_path / "gallery.md")
    text = out.read_text()
    title = script.read_text().split('"""')[1].strip().splitlines()[0]
    assert f"### {script.stem}: {title}" in text
    assert "| method | time | vs first | error |" in text
    assert "| peer | 300.0 ms | x 3.00 | 0.00e+00 |" in text
    assert text.count("(not run)") == len(SCRIPTS) - 1
