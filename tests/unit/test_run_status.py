"""Telling a live run from a killed one: status.json's pid (same host) or heartbeat (another host)."""

import os
import socket
import subprocess
import sys
import time

from kiln.runfolder.status import STALE_S, process_start, resolve_status, running_record


def test_this_process_is_running():
    record = running_record(3, time.time())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert resolve_status(record)["state"] == "running"


def test_a_dead_pid_means_interrupted():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    record = {**running_record(3, time.time()), "pid": child.pid, "pid_start": None}
    status = resolve_status(record)
    assert status["state"] == "interrupted" and "process is gone" in status["reason"]


def test_a_reused_pid_is_not_the_run():
    record = {**running_record(3, time.time()), "pid_start": "1"}  # this pid, but another start time
    assert process_start(os.getpid()) != "1"
    assert resolve_status(record)["state"] == "interrupted"


def test_another_host_is_judged_by_its_heartbeat():
    now = time.time()
    fresh = {"state": "running", "pid": 1, "host": "elsewhere", "heartbeat": now - 60}
    stale = {**fresh, "heartbeat": now - STALE_S - 1}
    assert resolve_status(fresh, now)["state"] == "running"
    assert resolve_status(stale, now)["state"] == "interrupted"


def test_ended_states_stay_as_written():
    for state in ("created", "finished", "failed", "stopped", "interrupted"):
        assert resolve_status({"state": state})["state"] == state
