"""Each fuzz target runs for a short while on a copy of its seed corpus (tests/fuzz/README.md).

A crash, an uncaught exception, a timeout, running out of memory or a descriptor leak the target reports fails
the test, showing the fuzzer's output and the inputs it wrote. Without atheris the tests fail saying so: they
never skip.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TARGETS = ("fuzz_request", "fuzz_session", "fuzz_manifest", "fuzz_multipart")
#: seconds of fuzzing per target in the test suite (a minute in all)
SECONDS = 15
#: libFuzzer's per-input limit: far above what one input takes (fuzz_session bounds its own at 10 s)
INPUT_TIMEOUT = 30


def require_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.fail("atheris is not installed, so the fuzz targets cannot run: pip install -e '.[test]'", pytrace=False)


def tail(text: str, limit: int = 12000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run_fuzzer(argv: list[str], corpus: Path, artifacts: Path, seconds: int) -> tuple[int, str, list[Path]]:
    """Run a target under libFuzzer for ``seconds``; its exit status, output and the inputs it wrote."""
    artifacts.mkdir()
    command = [
        sys.executable,
        *argv,
        f"-max_total_time={seconds}",
        f"-timeout={INPUT_TIMEOUT}",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=seconds + 180, check=False)
    output = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
    return done.returncode, output, sorted(artifacts.iterdir())


def failure_report(what: str, status: int, output: str, found: list[Path]) -> str:
    inputs = "\n".join(f"{p.name} ({p.stat().st_size} bytes): {p.read_bytes()[:4000]!r}" for p in found)
    return f"{what}: exit status {status}\n--- fuzzer output ---\n{tail(output)}\n--- inputs written ---\n{inputs}"


@pytest.mark.parametrize("target", TARGETS)
def test_target_finds_nothing(target: str, tmp_path: Path) -> None:
    require_atheris()
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus" / target, corpus)
    status, output, found = run_fuzzer(["-m", f"tests.fuzz.{target}"], corpus, tmp_path / "artifacts", SECONDS)
    if status != 0 or found:
        pytest.fail(failure_report(target, status, output, found), pytrace=False)
    runs = re.search(r"^Done (\d+) runs in", output, re.MULTILINE)
    assert runs is not None and int(runs.group(1)) > 0, f"{target} did not fuzz:\n{tail(output)}"


@pytest.mark.parametrize("target", TARGETS)
def test_regression_inputs_pass(target: str) -> None:
    """What the fuzzers once found (tests/fuzz/regressions/<target>/), replayed: each input runs once."""
    require_atheris()
    inputs = sorted((HERE / "regressions" / target).glob("*"))
    if not inputs:
        return  # nothing found for this target yet
    command = [sys.executable, "-m", f"tests.fuzz.{target}", f"-timeout={INPUT_TIMEOUT}", *map(str, inputs)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300, check=False)
    output = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, f"{target}: exit status {done.returncode}\n{tail(output)}"
    for path in inputs:
        assert f"Executed {path}" in output, f"{path} did not run:\n{tail(output)}"


def test_a_crashing_target_is_reported(tmp_path: Path) -> None:
    """The check above can fail: a target that raises on its seed is reported, with the input it crashed on."""
    require_atheris()
    script = tmp_path / "crashing_target.py"
    script.write_text(
        "import sys\n"
        "import atheris\n"
        "def test_one_input(data):\n"
        "    if data.startswith(b'BOOM'):\n"
        "        raise ValueError('the parser blew up')\n"
        "atheris.Setup(sys.argv, test_one_input)\n"
        "atheris.Fuzz()\n"
    )
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(b"BOOM!")
    status, output, found = run_fuzzer([str(script)], corpus, tmp_path / "artifacts", 30)
    assert status != 0, output
    assert "ValueError: the parser blew up" in output
    assert [p.read_bytes() for p in found] == [b"BOOM!"], failure_report("crashing target", status, output, found)
