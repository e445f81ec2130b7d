"""The benchmark helpers that tie a result to the code it measured."""
import re
import subprocess

from scripts import bench_common


def test_source_commit_names_the_checkout_head(monkeypatch):
    monkeypatch.delenv("ATOM_JAX_SOURCE_COMMIT", raising=False)
    head = subprocess.run(["git", "-C", str(bench_common.REPO), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    commit = bench_common.source_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
    assert commit.split("+")[0] == head


def test_source_commit_from_the_environment_wins(monkeypatch):
    """A copied tree may carry a .git of some other commit."""
    monkeypatch.setenv("ATOM_JAX_SOURCE_COMMIT", "0123abc")
    assert bench_common.source_commit() == "0123abc"


def test_source_commit_of_a_tree_without_history_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_common, "REPO", tmp_path)
    monkeypatch.delenv("ATOM_JAX_SOURCE_COMMIT", raising=False)
    assert bench_common.source_commit() == "unknown"
