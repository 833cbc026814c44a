"""Shared by the scripts' tests: press Ctrl-C in a running script."""

import os
import signal
import subprocess
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ctrl_c():
    """ctrl_c(cmd, when): run `cmd` in the repository root, send it SIGINT (Ctrl-C) once a line of its stdout contains
    `when`, and return (exit code, stdout, stderr). A run that never prints `when` is killed after `timeout` s."""

    def run(cmd, when, timeout=240):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
        timer = threading.Timer(timeout, proc.kill)  # for a run that never prints `when`
        timer.start()
        out = []
        for line in proc.stdout:
            out.append(line)
            if when in line:
                timer.cancel()
                proc.send_signal(signal.SIGINT)
                break
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        timer.cancel()
        return proc.returncode, "".join(out) + stdout, stderr

    return run
