"""The console of the jobs: one line per error, credentials never printed, library output to the log."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline.console import root_cause

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_root_cause_names_the_workers_error_not_the_wrapper():
    class WorkerGroupError(Exception):
        pass

    text = ("Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nTraceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise InductorError(e)\n'
            "torch._inductor.exc.InductorError: CppCompileError: C++ compile error\n")
    line = root_cause(WorkerGroupError(text))
    assert line == ("WorkerGroupError: Training failed due to worker errors: -> "
                    "torch._inductor.exc.InductorError: CppCompileError: C++ compile error")
    assert root_cause(ValueError("bad value\nmore")) == "ValueError: bad value"


_SCRIPT = r"""
import os, sys, warnings
from pipeline.console import run_job, say
from pipeline.errors import PipelineError

def body():
    say("hello from the job")
    say("storage s3://b/p?X-Amz-Signature=SECRET&x=1")
    print("library chatter on stdout")
    os.write(2, b"C-level chatter on fd 2\n")
    warnings.warn("a deprecation nobody asked for")
    if sys.argv[1] == "user":
        raise PipelineError("data.root: no shard index at /nowhere")
    if sys.argv[1] == "bug":
        raise KeyError("boom")
    return 0

sys.exit(run_job("t", body))
"""


def test_run_job_keeps_the_terminal_clean_and_errors_on_one_line(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "COATNET_LOG_DIR": str(tmp_path / "logs")}
    for mode, rc in (("ok", 0), ("user", 2), ("bug", 1)):
        r = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == rc, r.stderr
        out = r.stdout.splitlines()
        assert out[0].startswith("log file") and out[1:3] == ["hello from the job", "storage s3://b/p?X-Amz-Signature=***&x=1"]
        terminal = r.stdout + r.stderr
        for noise in ("chatter", "deprecation", "Traceback", "SECRET"):
            assert noise not in terminal, (noise, terminal)
        log = open(out[0].split(None, 2)[2]).read()
        assert "library chatter on stdout" in log and "C-level chatter on fd 2" in log and "deprecation" in log
        errors = r.stderr.strip().splitlines()
        if mode == "user":
            assert errors[0] == "error: data.root: no shard index at /nowhere"
        if mode == "bug":
            assert len(errors) == 1 and errors[0].startswith("error: KeyError: 'boom' (traceback in ")
            assert "Traceback" in log
