"""scripts/dashboard.py renders the committed benchmark JSON into a README with plots."""
import shutil
from pathlib import Path

from scripts.dashboard import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def test_dashboard_renders_every_committed_result(tmp_path):
    for path in BENCHMARKS.glob("*.json"):
        shutil.copy(path, tmp_path)
    main(["--dir", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    for path in BENCHMARKS.glob("*.json"):
        assert f"({path.name})" in readme  # every result has its section
    for image in ("kernels-h200.png", "offline-cpu.png"):
        assert (tmp_path / image).stat().st_size > 1000 and f"]({image})" in readme
