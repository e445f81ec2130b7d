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


def test_dashboard_plots_serving_runs_against_concurrency(tmp_path):
    import json
    for concurrency, tput in ((1, 50.0), (8, 300.0)):  # the shape bench_serving.py writes
        run = {"backend": "openai", "max_concurrency": concurrency, "request_rate": None,
               "output_throughput": tput, "p99_ttft_ms": 10.0 * concurrency,
               "p99_tpot_ms": 5.0, "p99_itl_ms": 5.0}
        (tmp_path / f"serving-c{concurrency}.json").write_text(json.dumps(run))
    main(["--dir", str(tmp_path)])
    assert "![serving](serving.png)" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "serving.png").stat().st_size > 1000


def test_dashboard_names_the_commit_a_result_measured(tmp_path):
    import json
    result = json.loads((BENCHMARKS / "latency-llama-3.1-8b.json").read_text())
    result["versions"]["atom_jax_commit"] = "0123456789abcdef0123456789abcdef01234567+dirty"
    (tmp_path / "latency-x.json").write_text(json.dumps(result))
    main(["--dir", str(tmp_path)])
    assert "Code: 0123456789 with uncommitted changes." in (tmp_path / "README.md").read_text()


def test_a_run_with_the_decode_kernel_gets_a_headline_row_of_its_own(tmp_path):
    import json
    usual = json.loads((BENCHMARKS / "latency-llama-3.1-8b.json").read_text())
    kernel = json.loads((BENCHMARKS / "latency-llama-3.1-8b-decode-kernel.json").read_text())
    (tmp_path / "usual.json").write_text(json.dumps(usual))
    (tmp_path / "kernel.json").write_text(json.dumps(kernel))
    main(["--dir", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    row = [ln for ln in readme.splitlines() if ln.startswith("| llama-3.1-8b (decode kernel")]
    assert len(row) == 1 and f"{kernel['decode']['tokens_per_s']:.1f}" in row[0]
    assert f"{kernel['startup']['cold_s']:.1f} / {kernel['startup']['warm_s']:.1f}" in row[0]
    usual_row = [ln for ln in readme.splitlines() if ln.startswith("| llama-3.1-8b |")]
    assert len(usual_row) == 1 and f"{usual['decode']['tokens_per_s']:.1f}" in usual_row[0]
    assert f"Code: {kernel['commit'][:10]}." in readme   # the run's own commit field


def test_a_throughput_run_with_a_float8_cache_or_more_sequences_gets_its_own_row(tmp_path):
    import json
    usual = json.loads((BENCHMARKS / "offline-1k1k-llama-3.1-8b.json").read_text())
    fp8 = dict(usual, output_tok_per_s=usual["output_tok_per_s"] * 1.25,
               kv_cache_dtype="float8_e4m3fn")
    per_token = dict(fp8, output_tok_per_s=usual["output_tok_per_s"] * 1.125,
                     kv_cache_scales="per token and KV head")
    more_seqs = dict(fp8, output_tok_per_s=usual["output_tok_per_s"] * 1.375, max_num_seqs=512)
    for name, data in (("usual", usual), ("fp8", fp8), ("per_token", per_token),
                       ("more_seqs", more_seqs)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    main(["--dir", str(tmp_path)])
    lines = (tmp_path / "README.md").read_text().splitlines()
    for data, label in ((usual, ""), (fp8, " (float8 K/V cache)"),
                        (per_token, " (float8 K/V cache, scales per token)"),
                        (more_seqs, " (float8 K/V cache, 512 sequences)")):
        row = [ln for ln in lines if ln.startswith(f"| llama-3.1-8b{label} |")]
        assert len(row) == 1 and f"| {data['output_tok_per_s']:.0f} |" in row[0], label
    assert any("K/V cache: float8_e4m3fn." in ln for ln in lines)
    assert any("K/V cache: float8_e4m3fn, scales per token and KV head." in ln for ln in lines)
