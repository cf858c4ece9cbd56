"""The files profile, savings and compare write (report.md, JSON, PNG plots) and the run's transfer
plot, past a real file-size limit: one WriteError naming the file, the previous complete file still
in place, no temporary file left (issue 15)."""

import hashlib
from pathlib import Path

import pytest

from write_limits import file_size_limit
from mtpeft.errors import ConfigError, WriteError
from mtpeft.output_folder import check_folder_is_ours
from mtpeft.profile import report
from mtpeft.trainer.transfer import GradientProbe, plot

LIMIT = 64  # bytes: every file below is larger


def _hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


CURVES = {"run": {"defect": [(1, 0.7), (2, 0.6)], "clone": [(1, 0.69), (2, 0.5)]}}
WRITERS = {
    "report.md": lambda path, v: report.write_text(path, f"# report {v}\n" + "| a | b |\n" * 20),
    "report.json": lambda path, v: report.write_json(path, {"version": v, "rows": list(range(40))}),
    "throughput.png": lambda path, v: report.grouped_bars(path, f"t{v}", {"measured": {"a": v, "b": 2}}, "tokens/s"),
    "memory_breakdown.png": lambda path, v: report.stacked_bars(path, f"m{v}", {"x": {"p": v, "q": 1}}, "MiB"),
    "loss_curves.png": lambda path, v: report.loss_curves(path, f"l{v}", CURVES),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_failed_rewrite_keeps_the_previous_file(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, 1)
    before = _hashes(tmp_path)
    assert before[name] and path.stat().st_size > LIMIT
    with file_size_limit(LIMIT), pytest.raises(WriteError) as failed:
        WRITERS[name](path, 2)
    assert str(failed.value).startswith(f"{path}: cannot be written, the file-size limit")
    assert f"the previous {name} (if any) is unchanged" in str(failed.value)
    assert _hashes(tmp_path) == before  # the old file, byte for byte, and nothing beside it


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_rewrite_replaces_the_file(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, 1)
    first = _hashes(tmp_path)
    WRITERS[name](path, 2)
    assert _hashes(tmp_path).keys() == first.keys() and _hashes(tmp_path) != first


def test_plots_are_png_whatever_the_temporary_name(tmp_path):
    for name in ("throughput.png", "loss_curves.png"):
        WRITERS[name](tmp_path / name, 1)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_transfer_plot_keeps_the_previous_one(tmp_path):
    import torch

    probe = GradientProbe(["defect", "clone"])
    probe.record(0, [torch.tensor([1.0, 0.0])])
    probe.record(1, [torch.tensor([1.0, 1.0])])
    probe.finish(probe.local_stats())
    probe.save(tmp_path / "transfer.jsonl", 4)
    plot(tmp_path / "transfer.jsonl", tmp_path / "transfer.png")
    before = _hashes(tmp_path)
    with file_size_limit(LIMIT), pytest.raises(WriteError, match=r"transfer.png: cannot be written"):
        plot(tmp_path / "transfer.jsonl", tmp_path / "transfer.png")
    assert _hashes(tmp_path) == before


def test_a_temporary_file_left_by_a_killed_write_counts_as_mtpefts(tmp_path):
    (tmp_path / "report.md").write_text("# an earlier report\n")
    (tmp_path / "report.md.tmp").write_text("# cut sh")  # what a kill -9 mid-write leaves
    assert check_folder_is_ours(tmp_path, "--out", {"report.md"}, force=False) == []
    (tmp_path / "notes.txt.tmp").write_text("someone else's")
    with pytest.raises(ConfigError, match=r"holds 'notes.txt.tmp', which mtpeft did not write"):
        check_folder_is_ours(tmp_path, "--out", {"report.md"}, force=False)
