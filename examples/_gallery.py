"""Shared helpers of the gallery scripts (``examples/plot_NN_name.py``); not an example itself.

Conventions of a gallery script (sphinx-gallery style, so the docs render it as a page):

- File ``examples/plot_NN_short_name.py``; a module docstring first: an RST title
  (``Title\\n=====``) and a few lines saying what is computed and against which peer.
  Then ``# %%`` cells, each starting with a few comment lines of RST text.
- ``from _gallery import ...`` (the script's folder is on ``sys.path`` when run as
  ``python examples/plot_NN.py``; the docs' ``conf.py`` adds ``examples/`` for sphinx-gallery).
  Only the public API of lazymat: ``import lazymat as lm`` / ``from lazymat import Vi, Vj``.
- Sizes: ``n = sized(small=..., full=...)``. ``LAZYMAT_GALLERY_SIZE=small`` is what
  ``tests/test_gallery.py`` runs: **≤ 4 s per script** on a quiet 2-core machine including the
  interpreter start and the peers (all 13 scripts ≤ 60 s). ``full`` (the default, ``make gallery``):
  well under a minute per script on 2 cores.
- Correctness: every script *asserts* its own check against a dense or exact computation
  (``check_close`` or a plain ``assert``), at both sizes, so a wrong answer exits non-zero and
  fails the test. Timings never assert (the machine is shared).
- Timings: ``median_time(fn)`` for lazymat and for each peer in the same run, after one warm-up
  call (lazymat's first call compiles). A peer that is not installed is a skipped row:
  ``faiss = peer("faiss")`` returns ``None`` and prints why; ``need("sklearn")`` for a package
  the example cannot do without (exits with code 77, which the test reports as a skip).
- Results: ``print_table(title, rows)``; each row is a dict with ``"method"`` and ``"seconds"``
  (``None`` for a skipped peer) and any other columns (error, memory, accuracy); the ratio to the
  first row is added (to the first row of the same ``"case"``, if rows have one: put lazymat
  first). The table also goes to ``<output>/<script>.txt``.
- Pictures: ``save_figure(fig, "name")`` writes ``<output>/<script>_name.png`` (matplotlib's Agg
  backend; the figure stays open so sphinx-gallery shows it too); ``save_gif(frames, "name")``
  for animations. ``<output>`` is ``$LAZYMAT_GALLERY_OUTPUT``, else ``examples/output/``
  (git-ignored).
- ``header()`` first: it prints the size, the lazymat version, the threads and the load, so every
  figure comes with the state of the machine it was measured on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("MPLBACKEND", "Agg")  # before matplotlib is imported anywhere

SKIP_EXIT_CODE = 77  # tests/test_gallery.py turns this exit code into a skip

_SIZES = ("small", "full")
SIZE = os.environ.get("LAZYMAT_GALLERY_SIZE", "full").strip().lower() or "full"
if SIZE not in _SIZES:
    raise ValueError(f"LAZYMAT_GALLERY_SIZE must be one of {_SIZES}, got {SIZE!r}")
SMALL = SIZE == "small"


def sized(small: Any, full: Any) -> Any:
    """``small`` under ``LAZYMAT_GALLERY_SIZE=small`` (the tests), else ``full``.

    >>> n = sized(small=1_000, full=1_000_000)
    """
    return small if SMALL else full


def _script_name() -> str:
    """The calling example's file name: the first frame outside this module that has a
    ``__file__`` (sphinx-gallery runs every example inside one sphinx-build process and sets
    ``__file__`` in the example's globals)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_globals.get("__name__") == __name__
                                 or "__file__" not in frame.f_globals):
        frame = frame.f_back
    return Path(frame.f_globals["__file__"]).stem if frame is not None else "gallery"


def output_dir() -> Path:
    """Where pictures and tables go: ``$LAZYMAT_GALLERY_OUTPUT`` or ``examples/output/``."""
    path = Path(os.environ.get("LAZYMAT_GALLERY_OUTPUT") or Path(__file__).parent / "output")
    path.mkdir(parents=True, exist_ok=True)
    return path


def header(title: str) -> None:
    """Print the title and the state of the machine: size, versions, threads, load."""
    import lazymat

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    threads = ""
    if "torch" in sys.modules:
        threads = f", torch threads {sys.modules['torch'].get_num_threads()}"
    print(f"{title}\n  size={SIZE}, lazymat {lazymat.__version__}, {os.cpu_count()} cores"
          f"{threads}, load average {load}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print("  warning: the machine is busy (load above the number of cores): timings are "
              "noisy, and OpenMP peers that spin while they wait (faiss, FINUFFT, "
              "scikit-learn) lose the most")


def need(module: str) -> Any:
    """Import a package the example cannot do without, or exit with ``SKIP_EXIT_CODE``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        print(f"skipped: this example needs {module!r} (pip install '.[gallery]'): {exc}")
        raise SystemExit(SKIP_EXIT_CODE) from None


def peer(module: str) -> Any | None:
    """Import a peer library, or return ``None`` (and say so) so that its row is skipped.

    >>> faiss = peer("faiss")   # None without faiss-cpu: skip the faiss row
    """
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is as missing as an absent one
        print(f"  peer {module!r} not available, its row is skipped ({type(exc).__name__}: {exc})")
        return None


def median_time(fn: Callable[[], Any], repeat: int | None = None,
                warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` untimed calls;
    returns ``(seconds, result of the last call)``. ``repeat`` defaults to 1 at the small size
    (the tests), 3 at full size.

    >>> seconds, value = median_time(lambda: sum(range(1000)))
    """
    repeat = repeat if repeat is not None else sized(1, 3)
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        _sync(result)
        times.append(time.perf_counter() - start)
    times.sort()
    mid = len(times) // 2
    seconds = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    return seconds, result


def _sync(result: Any) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold after big frees, so freed blocks of up to 32 MiB stay
    resident and reused: a fixed threshold makes every big block an mmap, returned at free, so
    that the resident memory measures what a call allocates."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_fixed_mmap_threshold()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], Any], interval: float = 0.0005) -> tuple[int, Any]:
    """Peak growth of the process's resident memory while ``fn()`` runs (sampled by a thread;
    Linux ``/proc``, else 0); returns ``(bytes, result)``. Covers numpy, torch and C kernels.

    >>> extra, _ = peak_memory(lambda: bytearray(50_000_000))
    """
    import gc

    gc.collect()
    try:
        base = _rss_bytes()
    except OSError:
        return 0, fn()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        result = fn()
        peak[0] = max(peak[0], _rss_bytes())
    finally:
        done.set()
        watcher.join()
    return max(0, peak[0] - base), result


def check_close(actual: Any, expected: Any, rtol: float, what: str) -> float:
    """Assert ``max|actual - expected| <= rtol * max|expected|`` and return that relative error
    (arrays from numpy or torch; complex too). Prints the result either way.

    >>> err = check_close([1.0, 2.0], [1.0, 2.0 + 1e-9], 1e-6, "sum")
      check sum: max relative error 5.00e-10 (tolerance 1e-06) ok
    """
    import numpy as np

    a, e = _numpy(actual).astype(np.complex128 if _is_complex(actual, expected) else np.float64), \
        _numpy(expected).astype(np.complex128 if _is_complex(actual, expected) else np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    scale = float(np.abs(e).max()) if e.size else 0.0
    err = float(np.abs(a - e).max()) / (scale or 1.0) if e.size else 0.0
    ok = err <= rtol
    print(f"  check {what}: max relative error {err:.2e} (tolerance {rtol:.0e}) "
          f"{'ok' if ok else 'FAILED'}")
    if not ok:
        raise AssertionError(f"{what}: max relative error {err:.3e} > {rtol:.1e}")
    return err


def _numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _is_complex(*xs: Any) -> bool:
    import numpy as np

    return any(np.iscomplexobj(_numpy(x)) for x in xs)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


_WRITTEN: set[Path] = set()


def print_table(title: str, rows: Sequence[dict], save_as: str | None = None) -> str:
    """Print rows (dicts with ``method``, ``seconds`` and any other columns) as a table, with
    each time's ratio to the first row's (``x 2.00`` = twice as slow as the first row). Rows
    with a ``"case"`` key (say ``"N=10000"``) are compared with the first row of their case.
    Also written to ``<output>/<script>[_save_as].txt``, and as a markdown table to ``.md``
    (the tables of one run, which :func:`collect` gathers); returns the text.

    >>> rows = [{"method": "lazymat", "seconds": 0.1, "error": 1e-7},
    ...         {"method": "numpy", "seconds": 0.3, "error": 0.0}]
    >>> _ = print_table("demo", rows)  # doctest: +SKIP
    """
    grouped = any("case" in row for row in rows)
    columns = (["case"] if grouped else []) + ["method", "time", "vs first"]
    for row in rows:
        columns += [k for k in row if k not in ("method", "seconds", "case") and k not in columns]
    firsts: dict = {}
    for row in rows:
        firsts.setdefault(row.get("case"), row.get("seconds"))
    cells = []
    for row in rows:
        s, base = row.get("seconds"), firsts[row.get("case")]
        ratio = f"x {s / base:.2f}" if s is not None and base else "-"
        cell = {"case": str(row.get("case", "")), "method": str(row["method"]),
                "time": format_seconds(s), "vs first": ratio}
        for k in columns:
            if k not in cell:
                v = row.get(k, "")
                cell[k] = f"{v:.2e}" if isinstance(v, float) else str(v)
        cells.append(cell)
    widths = {c: max([len(c)] + [len(cell[c]) for cell in cells]) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    text = [title, line, "  ".join("-" * widths[c] for c in columns)]
    text += ["  ".join(cell[c].ljust(widths[c]) for c in columns).rstrip() for cell in cells]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text.append(f"(size={SIZE}, medians, load average {load})")
    out = "\n".join(text)
    print("\n" + out + "\n")
    path = output_dir() / (_script_name() + (f"_{save_as}" if save_as else "") + ".txt")
    markdown = [f"**{title}**", "", "| " + " | ".join(columns) + " |",
                "|" + "---|" * len(columns)]
    markdown += ["| " + " | ".join(cell[c].replace("|", "\\|") for c in columns) + " |"
                 for cell in cells]
    markdown += ["", f"*{SIZE} size, medians, load average {load}*", ""]
    for suffix, body in ((".txt", out + "\n"), (".md", "\n".join(markdown))):
        file = path.with_suffix(suffix)
        with open(file, "a" if file in _WRITTEN else "w") as f:  # a fresh file on each run
            f.write(body + "\n")
        _WRITTEN.add(file)
    return out


def collect(out: Path, source: Path | None = None) -> Path:
    """Gather the tables of the last run of every ``plot_*.py`` (their ``<output>/*.md``) into
    one markdown file, each under its script's title: ``make gallery`` writes
    ``benchmarks/results/gallery.md`` this way, the file the README and the docs quote.

    >>> collect(Path("/tmp/gallery.md"))  # doctest: +SKIP
    """
    import platform

    source = source or output_dir()
    lines = ["## lazymat gallery: each example against its peer", "",
             f"{platform.machine()}, {os.cpu_count()} cores, python "
             f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}, `make gallery` "
             "(every `examples/plot_*.py` at full size). Times are medians of the same run; "
             "`vs first` is the ratio to the table's first row (lazymat), above 1 when the "
             "other method is slower.", ""]
    for script in sorted(Path(__file__).parent.glob("plot_*.py")):
        doc = script.read_text().split('"""')[1].strip().splitlines()
        lines += [f"### {script.stem}: {doc[0]}", ""]
        tables = sorted(source.glob(f"{script.stem}*.md"))
        lines += [t.read_text().rstrip() + "\n" for t in tables] or ["(not run)", ""]
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    collect(Path(sys.argv[1]) if len(sys.argv) > 1
            else Path(__file__).parents[1] / "benchmarks" / "results" / "gallery.md")


def save_figure(fig: Any, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``<output>/<script>_<name>.png`` (it stays open, so that
    sphinx-gallery shows it too); returns the path."""
    path = output_dir() / f"{_script_name()}_{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    print(f"  saved {path}")
    return path


def save_gif(frames: Sequence[Any], name: str, fps: int = 12) -> Path:
    """Save frames (matplotlib figures or HxWx3 uint8 arrays) as ``<output>/<script>_<name>.gif``
    with Pillow; returns the path."""
    import numpy as np
    from PIL import Image

    images = []
    for frame in frames:
        if hasattr(frame, "canvas"):
            frame.canvas.draw()
            frame = np.asarray(frame.canvas.buffer_rgba())[..., :3]
        images.append(Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)))
    path = output_dir() / f"{_script_name()}_{name}.gif"
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps),
                   loop=0)
    print(f"  saved {path}")
    return path
