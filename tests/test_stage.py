"""What every stage script shares: a SabiaError or a write the machine refuses is one line and exit code 2."""

import errno
import os
import re
import subprocess
import sys

import pytest

from sabia_ift import stage
from sabia_ift.errors import DataError


def fails_with(exc: BaseException):
    def main(args):
        raise exc

    return main


def test_a_sabia_error_is_one_line(capsys):
    assert stage.run(fails_with(DataError("data/in.jsonl: line 2:\n  bad")), None, argv=[]) == 2
    assert capsys.readouterr().err == "error: data/in.jsonl: line 2: bad\n"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_a_write_refused_outside_the_atomic_outputs_is_one_line(capsys, code):
    """The Trainer writes its checkpoints itself: a full disk there is the machine's state, not a bug."""
    exc = OSError(code, os.strerror(code), "models/checkpoints/checkpoint-50/optimizer.pt")
    assert stage.run(fails_with(exc), None, argv=[]) == 2
    assert capsys.readouterr().err == f"error: models/checkpoints/checkpoint-50/optimizer.pt: {os.strerror(code)}\n"


def test_a_full_disk_without_a_file_name_is_still_one_line(capsys):
    assert stage.run(fails_with(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))), None, argv=[]) == 2
    assert capsys.readouterr().err == "error: No space left on device\n"


def test_other_os_errors_keep_their_traceback():
    """A missing file at this point is a bug to see, not a message to read."""
    with pytest.raises(FileNotFoundError):
        stage.run(fails_with(FileNotFoundError(errno.ENOENT, "No such file or directory", "x")), None, argv=[])


def test_each_log_line_says_how_far_into_the_stage_it_came():
    from conftest import REPO

    script = ("import logging, time\nfrom sabia_ift import stage\nstage.setup_logging()\n"
              "logging.getLogger('sabia_ift.x').info('loaded')\ntime.sleep(0.5)\n"
              "logging.getLogger('sabia_ift.x').warning('done')\n")
    lines = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                           timeout=120, check=True).stderr.splitlines()
    first, second = (re.fullmatch(r" *(\d+\.\d)s (INFO|WARNING) sabia_ift\.x: (loaded|done)", line) for line in lines)
    assert (first[2], first[3], second[2], second[3]) == ("INFO", "loaded", "WARNING", "done")
    assert float(second[1]) - float(first[1]) >= 0.4


BAR_SCRIPT = ("import sys\n"
              "if sys.argv[1] == 'stage':\n"
              "    from sabia_ift import stage\n"
              "from tqdm import tqdm\n"
              "for _ in tqdm(range(3), desc='library bar'):\n"
              "    pass\n")


def run_bar(mode: str, stderr) -> subprocess.CompletedProcess:
    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "HF_HUB_DISABLE_PROGRESS"))}
    return subprocess.run([sys.executable, "-c", BAR_SCRIPT, mode], cwd=REPO, env=env, stderr=stderr,
                          stdout=subprocess.PIPE, text=True, timeout=120)


def test_library_bars_stay_out_of_a_log():
    """tqdm bars redraw with \\r; in a log that is not a terminal each becomes one unreadable line."""
    assert "library bar" in run_bar("bare", subprocess.PIPE).stderr  # what tqdm does by itself
    assert run_bar("stage", subprocess.PIPE).stderr == ""


def test_library_bars_stay_on_a_terminal():
    import fcntl
    import pty
    import struct
    import termios

    main, terminal = pty.openpty()
    # A new terminal is 0 columns wide, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        run_bar("stage", terminal)
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal side is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(main)
    assert b"library bar" in drawn
