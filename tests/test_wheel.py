"""The wheel, installed into a fresh virtual environment, runs the pipeline outside any checkout.

Builds the wheel with ``pip wheel`` from a copy of the source tree, installs it into a new venv the
way docs/install.md says (``pip install -c constraints.txt torch==2.13.0
llmfeat-*.whl``: torch pinned, everything else from the constraints; no ranker extra, which the
feature pipeline does not need), then, with the CWD in a temp directory and the checkout out of
reach (no PYTHONPATH), runs the console script:

- project A, no feature repository of its own: ``llmfeat ingest`` (a tiny generic CSV log) ->
  ``encode`` (the embedded MiniLM) -> ``feast materialize`` (which applies first) -> ``feast lookup``
  on the repository packaged in the wheel, with the data dir in ./feast_repo/data;
- project B: ``llmfeat init`` writes the repository, whose ``feast apply`` then registers A's data dir;
- ``llmfeat bench`` refuses clearly (it needs a source checkout), and so does ``llmfeat ranker``
  without the ranker extra.

No data may be written into the installed package. This takes minutes (a venv and ~100 packages
from pip's cache; the first run on a machine downloads them) and is deliberately NOT marked slow:
installability is checked in CI's default run (`make test`). It prints its phase timings (-s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
# the source tree minus what is built, generated or local (a stale build/ would leak into the wheel)
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "data",
                                "runs", ".pytest_cache", ".hypothesis", "results", "tests")

LOG = """uid,sku,ts,stars
1,10,2024-01-01T00:00:00Z,5
1,11,2024-01-02T00:00:00Z,2
1,12,2024-01-03T00:00:00Z,4
1,13,2024-01-04T00:00:00Z,5
2,10,2024-01-01T06:00:00Z,3
2,12,2024-01-02T06:00:00Z,5
2,14,2024-01-03T06:00:00Z,1
2,11,2024-01-04T06:00:00Z,4
3,13,2024-01-01T12:00:00Z,4
3,14,2024-01-02T12:00:00Z,2
3,10,2024-01-03T12:00:00Z,5
3,12,2024-01-04T12:00:00Z,3
"""
ITEMS = """sku,title,cat
10,Red running shoes,Shoes|Sport
11,Blue wool hat,Hats
12,Green rain jacket,Jackets|Outdoor
13,Black leather belt,Accessories
14,White tennis socks,Socks|Sport
"""


def _torch_pin() -> str:
    """The running torch when it is a CPU build (so the venv gets the same wheel, never the CUDA
    one), else torch==2.13.0 as scripts/bootstrap.sh pins it."""
    import torch

    return f"torch=={torch.__version__}" if torch.__version__.endswith("+cpu") else "torch==2.13.0"


def _env() -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE dropped: the install skips byte-compiling (--no-compile), so each command
    # caches what it imports for the next one (feast, pandas, torch: seconds per command)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LLMFEAT_DATA_DIR", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(cmd: list[str], cwd: Path, timings: list[tuple[str, float]], label: str, expect: int = 0,
         timeout: int = 900) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    timings.append((label, time.perf_counter() - t0))
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"{label}: exit {proc.returncode}, expected {expect}\n{out}"
    return out


def test_wheel_installs_into_a_fresh_venv_and_runs_the_pipeline_outside_the_checkout(tmp_path):
    timings: list[tuple[str, float]] = []
    # -- build: pip wheel (isolated build env) from a clean copy of the sources
    src = Path(shutil.copytree(CHECKOUT, tmp_path / "src", ignore=IGNORE))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src], tmp_path, timings, "build")
    wheels = list(dist.glob("llmfeat-*.whl"))
    assert len(wheels) == 1, wheels

    # -- install into a fresh venv, as docs/install.md says
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, timings, "venv")
    py, llmfeat = venv / "bin" / "python", venv / "bin" / "llmfeat"
    # the pip of constraints.txt: it resolves the ~110 packages in half the time of Python 3.11's bundled 23.2
    _run([py, "-m", "pip", "install", "-q", "-c", CHECKOUT / "constraints.txt", "pip"], tmp_path, timings, "pip")
    _run([py, "-m", "pip", "install", "-q", "--no-compile", "-c", CHECKOUT / "constraints.txt", _torch_pin(),
          wheels[0]], tmp_path, timings, "pip install")
    site = Path(_run([py, "-c", "import llm_features, os; print(os.path.dirname(llm_features.__file__))"],
                     tmp_path, timings, "import").strip())
    assert site.is_relative_to(venv), f"llm_features imported from {site}, not from the venv"
    installed = site / "feast_repo"
    shipped = sorted(p.relative_to(installed) for p in installed.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    assert {Path("feature_store.yaml"), Path("feature_definitions.py"),
            Path("production/feature_store.postgres.yaml")} <= set(shipped), shipped
    for rel in shipped:  # the one copy of the definitions, shipped as it is in the checkout
        assert (installed / rel).read_bytes() == (CHECKOUT / "feast_repo" / rel).read_bytes(), rel

    def package_files() -> list[Path]:  # byte-code caches aside (a normal `pip install` writes them too)
        return sorted(p for p in installed.rglob("*") if "__pycache__" not in p.parts)

    before = package_files()

    # -- project A: the packaged feature repository (no ./feast_repo of its own)
    a = tmp_path / "project_a"
    a.mkdir()
    (a / "log.csv").write_text(LOG)
    (a / "items.csv").write_text(ITEMS)
    out = _run([llmfeat, "ingest", "--format", "generic", "--interactions", "log.csv", "--items", "items.csv",
                "--map", "user_id=uid", "--map", "item_id=sku", "--map", "event_timestamp=ts",
                "--map", "rating=stars", "--map", "genres=cat", "--item-text-column", "title",
                "--label-rule", "rating>=4"], a, timings, "ingest")
    data = a / "feast_repo" / "data"
    assert (data / "canonical" / "interactions.parquet").is_file(), out
    _run([llmfeat, "encode", "--no-progress"], a, timings, "encode")
    # `feast materialize` runs `feast apply` first (one process instead of two: each pays ~10 s of imports)
    out = _run([llmfeat, "feast", "materialize"], a, timings, "feast apply + materialize")
    assert "using the feature repository packaged with llmfeat" in out, out
    assert "item_embeddings" in out and "materialized" in out, out
    out = _run([llmfeat, "feast", "lookup", "--user-id", "1", "--item-ids", "10", "--item-ids", "14"],
               a, timings, "feast lookup")
    assert "item_embedding" in out and "present 2/2  [2x384]" in out, out
    assert (data / "registry.db").is_file() and (data / "online_store.db").is_file()
    assert not (a / "feast_repo" / "feature_store.yaml").exists()
    assert package_files() == before, "the installed package was written to"

    # -- project B: `llmfeat init` writes a repository of its own, which then serves A's data dir
    b = tmp_path / "project_b"
    b.mkdir()
    out = _run([llmfeat, "init"], b, timings, "init")
    for rel in shipped:
        assert (b / "feast_repo" / rel).read_bytes() == (installed / rel).read_bytes(), rel
    # its definitions (run from the project, importing the installed llm_features) register A's data dir
    out = _run([llmfeat, "feast", "apply", "--data-dir", data], b, timings, "init'd: feast apply")
    assert "using the feature repository packaged" not in out, out
    assert not (b / "feast_repo" / "data" / "registry.db").exists()  # the registry went to --data-dir
    assert package_files() == before, "the installed package was written to"

    # -- llmfeat bench needs a source checkout; the ranker needs its extra, which is not installed here
    out = _run([llmfeat, "bench", "--summary-only"], b, timings, "bench", expect=1)
    assert "needs a source checkout" in out, out
    out = _run([llmfeat, "ranker", "train", "--data-dir", data, "--out", b / "ranker"], b, timings, "ranker",
               expect=1)
    assert "the TorchRec ranker needs the module" in out and "llmfeat[ranker-cpu]" in out, out
    assert "Traceback" not in out, out

    total = sum(s for _, s in timings)
    print("\nwheel test timings: " + ", ".join(f"{k} {s:.0f}s" for k, s in timings) + f"; total {total:.0f}s")
