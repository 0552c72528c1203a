"""The short version of bench/soak.py: clients whose connections keep dropping lose no request, and each
resume replays exactly from the last message the client saw + 1."""
import json
import subprocess
import sys

from conftest import REPO


def test_short_soak_loses_nothing(tiny_model, tmp_path):
    report_file = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--model", str(tiny_model),
                             "--clients", "6", "--requests", "3", "--max-tokens", "48", "--drop-rate", "1.0",
                             "--seconds", "120", "--json", str(report_file)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_file.read_text())
    assert report["lost"] == 0 and report["refused"] == 0 and report["completed"] == 18
    assert report["drops"] > 0 and report["server_peak_rss_mb"] > 0
    # The protocol under the client's de-duplication: each resume replayed from the last seq seen + 1
    assert report["bad_resumes"] == 0, report["bad_resume_examples"]
    assert report["resumes_checked"] > 0
