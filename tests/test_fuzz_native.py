"""The atheris harness of the native core (fuzz/fuzz_native.py) runs: its seeds decode the same both ways, and a
short libFuzzer run from them finds nothing. ``make fuzz-native`` runs it for minutes, then under AddressSanitizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mzstore.codecs import native

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_native.py"


@pytest.mark.skipif(native.core is None, reason="MZSTORE_NATIVE=0 or no compiler: there is no native core to fuzz")
def test_a_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    done = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=3000", "-seed=1", str(corpus)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 3000 runs" in done.stderr
    assert len(list(corpus.iterdir())) >= 40, "the seed corpus of valid payloads was written"
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*"))
