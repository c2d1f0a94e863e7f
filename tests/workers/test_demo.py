"""`cfnesa demo` end to end, as a user runs it: embedded services, featurizer,
worker, live output; and Ctrl-C stops everything, leaving no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

CFNESA = Path(sys.executable).parent / "cfnesa"
LINES = [
    "Hello, thanks for calling, how can I help?",
    "My order never arrived and I am really upset about it.",
    "I am sorry to hear that, let me check.",
    "This is the third time this happens, it is unacceptable!",
    "I understand, I will refund you right away.",
    "Okay, thank you, that is great news.",
]


def _transcripts(path: Path, calls: int) -> Path:
    with path.open("w") as fh:
        for i in range(calls):
            utterances = [
                {"speaker": ("spk0", "spk1")[j % 2], "text": t, "emotion": "neutral"}
                for j, t in enumerate(LINES)
            ]
            fh.write(
                json.dumps({"dialogue_id": f"d{i}", "split": "test", "utterances": utterances})
            )
            fh.write("\n")
    return path


def _demo(tmp_path: Path, *extra: str) -> str:
    data = _transcripts(tmp_path / "calls.jsonl", 2)
    done = subprocess.run(
        [
            str(CFNESA),
            "demo",
            "--data",
            str(data),
            "--limit",
            "2",
            "--calls",
            "2",
            "--rate",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_demo_runs_the_whole_pipeline(tmp_path: Path):
    out = _demo(tmp_path)
    assert "kafka   127.0.0.1:" in out and "redis   redis://127.0.0.1:" in out
    assert "dashboard: http://127.0.0.1:" in out and "/?token=" in out
    assert "roles: the first speaker of each call is the agent" in out
    emotion_lines = [ln for ln in out.splitlines() if ln.startswith("call-") and "shift" in ln]
    assert len(emotion_lines) >= 2 * len(LINES)
    # roles and sentiment on every line: spk0 opened each call, so spk0 is the agent
    assert all(" spk0      agent " in ln or " spk1      customer " in ln for ln in emotion_lines)
    assert all(" sentiment " in ln for ln in emotion_lines)
    assert any(" spk0      agent " in ln for ln in emotion_lines)
    assert out.count("summary of call-") == 2
    assert "customer sentiment " in out and "agent sentiment " in out
    assert "demo stopped: 12 emotion events" in out


def test_demo_leaves_the_agent_out_one_flag_away(tmp_path: Path):
    out = _demo(tmp_path, "--analyze-roles", "customer")
    assert "emotions inferred for: customer" in out
    emotion_lines = [ln for ln in out.splitlines() if ln.startswith("call-") and "shift" in ln]
    assert emotion_lines and all(" spk1      customer " in ln for ln in emotion_lines)
    assert "agent sentiment" not in out
    assert out.count("3 utterances of roles not analysed") == 2
    assert "demo stopped: 6 emotion events" in out


def test_ctrl_c_stops_everything(tmp_path: Path):
    data = _transcripts(tmp_path / "calls.jsonl", 50)
    proc = subprocess.Popen(
        [str(CFNESA), "demo", "--data", str(data), "--calls", "4", "--rate", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        _interrupt_and_check(proc)
    finally:  # a failed check must not leave the pipeline running
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def _interrupt_and_check(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    children: list[psutil.Process] = []
    deadline = time.monotonic() + 180
    for line in proc.stdout:  # wait until emotions flow
        if line.startswith("call-"):
            break
        assert time.monotonic() < deadline, "no emotion event in time"
    children = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    for part in ("tansu", "redis-server", "worker", "featurize", "gateway"):
        assert part in names, names
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, rest[-2000:]
    assert time.monotonic() - started < 15
    assert "demo stopped" in rest
    _, alive = psutil.wait_procs(children, timeout=5)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]


def test_services_prints_its_urls_and_stops_on_ctrl_c(tmp_path: Path):
    proc = subprocess.Popen(
        [str(CFNESA), "services"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        _check_services(proc)
    finally:  # a failed check must not leave the services running
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_services(proc: subprocess.Popen[str]) -> None:
    import socket

    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops both" in line:
            break
    text = "".join(lines)
    assert "Ctrl-C stops both" in text, text
    kafka = text.split("kafka (tansu, in memory): ")[1].split()[0]
    redis_url = text.split("CFNESA_REDIS_URL=")[1].split()[0]
    host, port = kafka.split(":")
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    for p in (int(port), redis_port):
        socket.create_connection((host, p), timeout=2).close()  # both answer
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    for p in (int(port), redis_port):
        with pytest.raises(OSError):
            socket.create_connection((host, p), timeout=2).close()
