"""Builds that clean up after themselves, on a tiny model: a build stopped by SIGTERM or SIGINT
leaves nothing, a killed build's temporary is removed by the next build, a full disk is one
line and leaves no partial artifact; SIGTERM in another command removes its temporary files.

The process tests run ``kvcompile build`` in a child process. The child's writing step is made
to wait once everything is written into the temporary directory (``_write_files`` wrapped,
nothing else changed), so the signal always lands while that directory is full, however fast
or slow the machine; every wait of the parent is bounded.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kvcompile.build import staging
from kvcompile.build.artifact import MANIFEST, WEIGHTS
from kvcompile.cli import main
from kvcompile.profile.record import save_profile
from kvcompile.runtime import load
from tests.test_profile_io import saved_tiny_model

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300  # seconds for the child to import torch, load the model and reach the write
# the child: `kvcompile build ARGS`, its writing step held open once the temporary is complete
CHILD = """
import sys, time
import kvcompile.build.artifact as artifact
real = artifact._write_files
def held(tmp, *args, **kwargs):
    real(tmp, *args, **kwargs)
    (tmp / "written").touch()
    time.sleep(600)
artifact._write_files = held
from kvcompile.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny model directory and its profile (what `kvcompile build` needs)."""
    root = tmp_path_factory.mktemp("cleanup")
    source, _, profile = saved_tiny_model(root)
    save_profile(profile, root / "profile.yaml")
    return {"model": source, "profile": root / "profile.yaml"}


def build_args(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["build", str(tiny["model"]), "--profile", str(tiny["profile"]), "-o", str(out),
            "--max-context", "96", *extra]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def temporaries(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def start_held_build(tiny: dict[str, Path], out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A `kvcompile build` child process held with its temporary directory complete."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, *build_args(tiny, out, *extra)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            held = [p for p in temporaries(out) if (p / "written").exists()]
            if held:
                return child, held[0]
            if child.poll() is not None:
                pytest.fail(f"the build ended before it was held: {child.returncode} "
                            f"{child.stderr.read() if child.stderr else ''}")
            time.sleep(0.05)
    except BaseException:
        child.kill()
        child.wait(timeout=60)
        raise
    child.kill()
    child.wait(timeout=60)
    pytest.fail(f"no complete temporary directory appeared within {START_TIMEOUT} s")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_build_removes_its_temporary_and_exits_128_plus_the_signal(
        tiny, tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "artifact"
    child, held = start_held_build(tiny, out)
    assert (held / MANIFEST).is_file() and (held / WEIGHTS).is_file()  # a full temporary
    assert str(child.pid) in held.name  # its owner, for the next build to tell
    child.send_signal(signum)
    try:
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == code, stderr
    assert signal.Signals(signum).name in one_line(stderr)
    assert list(tmp_path.iterdir()) == []  # no artifact, no temporary


def test_a_killed_builds_temporary_is_removed_by_the_next_build(tiny, tmp_path: Path) -> None:
    """SIGKILL leaves the temporary (nothing can run); the next build into the same place
    removes it, and only it: a live process's, another host's and an unowned one stay."""
    out = tmp_path / "artifact"
    child, held = start_held_build(tiny, out)
    child.kill()
    child.wait(timeout=60)
    assert held.is_dir()  # SIGKILL: left behind
    host = staging.host_name()
    live = tmp_path / f".artifact.tmp-{os.getpid()}@{host}-live0001"  # this process: running
    other_host = tmp_path / f".artifact.tmp-{child.pid}@elsewhere.example-abcd1234"
    unowned = tmp_path / ".artifact.tmp-k2j4h5g6"  # an older kvcompile's: no pid to check
    for keep in (live, other_host, unowned):
        keep.mkdir()
    result = invoke(*build_args(tiny, out, "--no-onnx"))
    assert result.exit_code == 0, result.stderr
    assert f"removed {held.name}" in result.stdout
    assert not held.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["artifact", live.name, other_host.name, unowned.name])
    assert load(out).generate([5, 6, 7], max_new_tokens=2).token_ids  # the new build serves


def test_only_dead_processes_on_this_host_own_stale_temporaries(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=60, check=True)
    dead = int(gone.stdout)
    assert not staging.process_alive(dead) and staging.process_alive(os.getpid())
    out = tmp_path / "a.b"  # a dot in the name: the pattern escapes it
    host = staging.host_name()
    names = {f".a.b.tmp-{dead}@{host}-x1y2z3_4": True, f".a.b.old-{dead}@{host}-abcdefgh": True,
             f".a.b.tmp-{os.getpid()}@{host}-abcdefgh": False,
             f".a.b.tmp-{dead}@elsewhere.example-abcdefgh": False, f".aXb.tmp-{dead}@{host}-abcdefgh": False,
             f".a.b.tmp-{dead}@{host}": False, ".a.b.tmp-abcdefgh": False}
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f".a.b.tmp-{dead}@{host}-file0000").write_text("a file, not a build's directory")
    assert {p.name for p in staging.stale_temporaries(out)} == {n for n, s in names.items() if s}


@pytest.mark.parametrize("where", ["weights", "manifest"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_artifact(tiny, tmp_path: Path, monkeypatch,
                                                                 where: str) -> None:
    """ENOSPC at the weights (safetensors' own error, as it reports a full disk) or at the
    manifest, the last file written (an OSError): one line, nothing beside the output; with
    --force the artifact already there is left as it was."""
    import kvcompile.build.artifact as artifact_module

    out = tmp_path / "artifact"
    assert invoke(*build_args(tiny, out, "--no-onnx")).exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if where == "weights":
        from safetensors import SafetensorError

        def full(state, path, metadata=None):
            Path(path).write_bytes(b"\0" * 1024)  # what a disk takes before it is full
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")

        monkeypatch.setattr(artifact_module, "save_file", full)
    else:
        def full(path, text):
            Path(path).write_text(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(artifact_module, "atomic_write_text", full)
    for args in (build_args(tiny, tmp_path / "new", "--no-onnx"),
                 build_args(tiny, out, "--no-onnx", "--force")):
        result = invoke(*args)
        assert result.exit_code == 2
        line = one_line(result.stderr)
        assert line.startswith("error: no space left") and "free space" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_fit_removes_its_temporary_file(tiny, tmp_path: Path, monkeypatch,
                                                        signum: int, code: int) -> None:
    """The signal arrives while the refitted profile is being written (its temporary file
    exists): no temporary, no output, one line, 128 + the signal; the handler is restored."""
    import kvcompile.yamlio

    seen, returned = [], []

    def signalled_fsync(fd: int) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
        returned.append(fd)

    def unhandled(signum: int, frame) -> None:  # were the CLI not to handle SIGTERM, not die
        raise AssertionError("SIGTERM reached the test's own handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        monkeypatch.setattr(kvcompile.yamlio.os, "fsync", signalled_fsync)
        out = tmp_path / "refit.yaml"
        result = invoke("fit", tiny["profile"], "--kv-budget", "0.5", "-o", out)
        assert result.exit_code == code, result.output
        assert any(name.startswith(".refit.yaml.") for name in seen) and not returned
        assert list(tmp_path.iterdir()) == []
        assert signal.Signals(signum).name in one_line(result.stderr)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the CLI's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_complete_build_leaves_only_the_artifact(tiny, tmp_path: Path) -> None:
    """Control for the tests above: the same build, not interrupted, is whole and verified."""
    out = tmp_path / "artifact"
    result = invoke(*build_args(tiny, out, "--no-onnx"))
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]
    assert yaml.safe_load((out / MANIFEST).read_text())["format"] == "kvcompile-artifact/1"
    assert invoke(*build_args(tiny, out, "--no-onnx", "--force")).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # the replaced one is gone too


def test_a_full_disk_is_told_from_other_errors(tmp_path: Path, monkeypatch) -> None:
    """As each writer reports it: an errno, safetensors' message, a chained OSError, or numpy's
    short write (no errno) while the device is full; never an interrupt or an unrelated error."""
    from collections import namedtuple

    from safetensors import SafetensorError

    def chained() -> BaseException:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as cause:
            try:
                raise RuntimeError("save failed") from cause
            except RuntimeError as exc:
                return exc

    assert staging.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert staging.is_disk_full(SafetensorError("Error while serializing: I/O error: No space "
                                                "left on device (os error 28)"))
    assert staging.is_disk_full(chained())
    short_write = OSError("4096 requested and 2048 written")
    assert not staging.is_disk_full(short_write)
    assert not staging.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 4096))
    assert staging.is_disk_full(short_write, tmp_path)
    assert not staging.is_disk_full(KeyboardInterrupt(), tmp_path)
    from kvcompile.errors import ArtifactError  # not an I/O error: a failed check stays itself
    assert not staging.is_disk_full(ArtifactError("ONNX parity failed"), tmp_path)


def test_a_signal_during_the_final_swap_waits_until_it_is_done(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM between moving the old artifact aside and renaming the new one in: the swap
    completes, the replaced artifact is removed, then the signal stops the process."""
    from kvcompile.interrupts import Terminated, signals_as_exceptions

    out, new = tmp_path / "art", tmp_path / ".art.tmp-new"
    out.mkdir()
    (out / "version").write_text("old")
    new.mkdir()
    (new / "version").write_text("new")
    make = staging.make_temporary

    def make_then_signal(out_dir: Path, kind: str = staging.TEMPORARY) -> Path:
        path = make(out_dir, kind)
        os.kill(os.getpid(), signal.SIGTERM)  # deferred: the swap is under way
        return path

    monkeypatch.setattr(staging, "make_temporary", make_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), signals_as_exceptions():
        staging.move_into_place(new, out)
    assert signal.getsignal(signal.SIGTERM) == previous
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert (out / "version").read_text() == "new"
