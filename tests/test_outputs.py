"""Atomic outputs: a killed writer's temporary path is removed by the next run for the same destination,
a live writer's is never touched, and ones nobody can judge are reported where they are."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffcli import outputs
from diffcli.outputs import atomic_dir, atomic_file, clean_stale, leftovers, owner_tag

REPO = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys, time
    from diffcli.outputs import atomic_dir, atomic_file
    kind, dest = sys.argv[1], sys.argv[2]
    with (atomic_dir if kind == "dir" else atomic_file)(dest, force=True) as tmp:
        if kind == "dir":
            (tmp / "model.safetensors").write_bytes(b"x" * 4096)
        else:
            tmp.write_bytes(b"y" * 4096)
        print(tmp, flush=True)
        time.sleep(600)
""")


def _writer(kind: str, dest: Path) -> tuple[subprocess.Popen, Path]:
    """A child process stopped mid-write inside atomic_dir/atomic_file; returns it and its temporary path."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(dest)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().strip()
    assert line, "the writer did not start"
    return proc, Path(line)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_sigkilled_writers_temporary_is_removed_by_the_next_run(tmp_path, kind):
    dest = tmp_path / ("merged" if kind == "dir" else "rte.diff")
    proc, tmp = _writer(kind, dest)
    _kill(proc)
    assert tmp.exists() and tmp.name.startswith(f".{dest.name}.tmp-") and not dest.exists()
    assert [(x.path, x.dead) for x in leftovers(dest)] == [(tmp, True)]

    with (atomic_dir if kind == "dir" else atomic_file)(dest) as new:
        assert not tmp.exists()  # gone before the new run writes anything
        (new / "ok").write_text("1") if kind == "dir" else new.write_text("1")
    assert dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_a_live_concurrent_writers_temporary_survives(tmp_path):
    dest = tmp_path / "merged"
    live, live_tmp = _writer("dir", dest)
    try:
        dead, dead_tmp = _writer("dir", dest)
        _kill(dead)
        assert {x.path: x.dead for x in leftovers(dest)} == {live_tmp: False, dead_tmp: True}
        with atomic_dir(dest) as new:
            (new / "ok").write_text("1")
        assert live_tmp.is_dir() and (live_tmp / "model.safetensors").stat().st_size == 4096
        assert not dead_tmp.exists() and (dest / "ok").is_file()
    finally:
        _kill(live)


def test_only_the_same_destinations_leftovers_are_touched(tmp_path):
    proc, other_tmp = _writer("dir", tmp_path / "other")
    _kill(proc)
    proc, similar_tmp = _writer("dir", tmp_path / "merged.tmp-x")  # its temp also starts with ".merged.tmp-"
    _kill(proc)
    assert clean_stale(tmp_path / "merged") == []
    assert other_tmp.exists() and similar_tmp.exists()
    assert clean_stale(tmp_path / "other") == [other_tmp]


def _fake(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.mkdir()
    (p / "weights").write_bytes(b"z")
    return p


def test_owner_from_another_boot_is_dead_and_a_reused_pid_is_not_alive(tmp_path):
    host_boot, pid, start = owner_tag().split("-")
    other_boot = _fake(tmp_path, f".out.tmp-{host_boot[:8]}{'f' * 8 if host_boot[8:] != 'f' * 8 else 'e' * 8}"
                                 f"-{os.getpid()}-{start}-abc")
    reused = _fake(tmp_path, f".out.tmp-{host_boot}-{os.getpid()}-{int(start) + 1}-abc")  # our pid, another start
    mine = _fake(tmp_path, f".out.tmp-{host_boot}-{os.getpid()}-{start}-abc")
    removed = clean_stale(tmp_path / "out")
    if start == "0":  # no /proc: start times unknown, a live pid counts as alive
        assert set(removed) == {other_boot}
    else:
        assert set(removed) == {other_boot, reused}
    assert mine.exists()


def test_unjudgeable_leftovers_are_reported_not_removed(tmp_path, caplog):
    old_style = _fake(tmp_path, ".merged.tmp-k2j4h5g6")  # an older diffprune's mkdtemp name
    _, pid, start = owner_tag().split("-")
    other_host = _fake(tmp_path, f".merged.tmp-{'0' * 16}-{pid}-{start}-abc")
    with caplog.at_level(logging.WARNING, logger="diffcli"):
        assert clean_stale(tmp_path / "merged") == []
    assert old_style.exists() and other_host.exists()
    assert str(old_style) in caplog.text and str(other_host) in caplog.text and "left in place" in caplog.text


def test_a_dead_runs_old_output_comes_back_when_the_destination_is_missing(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the old output is restored."""
    dest = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    tag = owner_tag(proc.pid)
    _kill(proc)
    old = _fake(tmp_path, f".merged.old-{tag}-1a2b")
    new = _fake(tmp_path, f".merged.tmp-{tag}-3c4d")
    clean_stale(dest)
    assert (dest / "weights").read_bytes() == b"z" and not old.exists() and not new.exists()


def test_replacing_an_output_leaves_nothing_beside_it(tmp_path):
    dest = tmp_path / "out"
    for _ in range(2):
        with atomic_dir(dest, force=True) as tmp:
            (tmp / "a").write_text("1")
    with atomic_file(tmp_path / "f.diff") as tmp:
        tmp.write_text("1")
    with atomic_file(tmp_path / "f.diff", force=True) as tmp:
        tmp.write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.diff", "out"]
    assert (tmp_path / "f.diff").read_text() == "2"


def test_long_output_names_stay_under_name_max(tmp_path):
    dest = tmp_path / ("n" * 240)
    with atomic_dir(dest) as tmp:
        assert len(tmp.name) < 255
    assert dest.is_dir()


def test_training_resume_state_is_not_a_leftover(tmp_path):
    """`<output>.partial/` is train's resumable state: no cleanup may remove it."""
    partial = _fake(tmp_path, "ckpt.partial")
    hidden = _fake(tmp_path, ".ckpt.partial")
    clean_stale(tmp_path / "ckpt")
    assert partial.exists() and hidden.exists()


def test_the_cli_removes_a_killed_runs_leftover_and_says_so(tmp_path, monkeypatch):
    """`diffprune pack` over a destination a killed run left a temporary for: removed, named on stderr."""
    from typer.testing import CliRunner

    from diffcli.cli.app import app

    proc, stale = _writer("file", tmp_path / "x.diff")
    _kill(proc)
    result = CliRunner().invoke(app, ["pack", str(REPO / "tests" / "data" / "golden_v1.diff"),
                                      "-o", str(tmp_path / "x.diff")])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (tmp_path / "x.diff").is_file()
    assert "removed 1 temporary path left by killed runs" in result.stderr


def test_pid_liveness_follows_proc(tmp_path):
    assert outputs._start_time(os.getpid()) is not None
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert outputs._start_time(proc.pid) is None or not outputs._have_proc()


def test_a_device_pipe_or_socket_is_never_replaced_even_with_force(tmp_path):
    """`-o /dev/null --force` once swapped the device node for a folder: special files are refused, exit 2."""
    import stat

    from typer.testing import CliRunner

    from diffcli.cli.app import app
    from diffcli.errors import InvalidValueError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for force in (False, True):
        with pytest.raises(InvalidValueError, match="device, pipe or socket"):
            outputs.check_output(fifo, force)
    with pytest.raises(InvalidValueError, match="device, pipe or socket"):
        with atomic_dir(fifo, force=True) as tmp:  # a writer that skipped the check is stopped at the swap
            (tmp / "a").write_text("1")
    for args in (["pack", str(REPO / "tests" / "data" / "golden_v1.diff")],
                 ["prune", str(REPO / "tests" / "data" / "golden_v1.diff"), "--sparsity", "50%"]):
        result = CliRunner().invoke(app, [*args, "-o", str(fifo), "--force"])
        assert result.exit_code == 2, result.output
        assert "is a device, pipe or socket" in result.stderr and "Traceback" not in result.output
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_link_to_a_pipe_is_refused_but_a_link_to_a_file_or_nothing_is_replaced(tmp_path):
    """`-o /dev/stdout --force` replaced the link /dev/stdout: a link is judged by what it names."""
    from diffcli.errors import InvalidValueError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    to_pipe = tmp_path / "to-pipe"
    to_pipe.symlink_to(fifo)
    with pytest.raises(InvalidValueError, match="to-pipe links to a device, pipe or socket"):
        outputs.check_output(to_pipe, True)
    with pytest.raises(InvalidValueError, match="device, pipe or socket"):
        with atomic_dir(to_pipe, force=True) as tmp:
            (tmp / "a").write_text("1")
    assert to_pipe.is_symlink() and os.readlink(to_pipe) == str(fifo)
    (tmp_path / "file").write_text("old")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    for name, target in (("to-file", tmp_path / "file"), ("dangling", tmp_path / "gone"), ("loop-a", None)):
        link = tmp_path / name
        if target is not None:
            link.symlink_to(target)
        outputs.check_output(link, True)
        with atomic_dir(link, force=True) as tmp:
            (tmp / "a").write_text("1")
        assert not link.is_symlink() and (link / "a").read_text() == "1"
    assert (tmp_path / "file").read_text() == "old"  # the link was replaced, not what it named


def test_written_files_get_the_usual_mode_not_safetensors_owner_only(tmp_path):
    """safetensors' save_file makes 0600 files: a checkpoint's diff.safetensors was unreadable to the group."""
    import torch
    from safetensors.torch import save_file

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "t.safetensors"))
            (tmp / "sub").mkdir()
            save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "u.safetensors"))
        with atomic_file(tmp_path / "f.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(mask)
    for f in (tmp_path / "out" / "t.safetensors", tmp_path / "out" / "sub" / "u.safetensors", tmp_path / "f.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o644, f
