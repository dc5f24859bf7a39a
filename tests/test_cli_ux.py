"""The CLI as a new user meets it (issue 13): no traps, one-line errors, honest summaries.

Each test runs the real ``mzstore`` command against a real ``mzstore serve``
and checks the exit code, that an error is exactly one ``error: …`` line with
no traceback, and that nothing was lost or mixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import free_port, start_serve, stop_serve
from safetensors.torch import save_file

from mzstore.cli.base import human
from mzstore.settings import server_address

UNWRITABLE = Path("/sys/mzstore-test")  # sysfs refuses new entries, even to root


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    address, proc = start_serve(tmp_path / "data", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield address
    stop_serve(proc)


def mz(*args: str, server: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **(env or {}))
    if server:
        full["MZSTORE_SERVER"] = server
    return subprocess.run(
        [sys.executable, "-m", "mzstore.cli", *args], env=full, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """Exit ``code``, stderr exactly one ``error: …`` line holding ``words``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def _model(path: Path, seed: int = 0, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(64, 32, generator=gen)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


# 1. a push with no weights -------------------------------------------------------------------------


def test_a_push_without_weights_is_refused_unless_asked_for(served: str, tmp_path: Path) -> None:
    src = tmp_path / "onnx-only"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.onnx").write_bytes(b"\x08\x07" * 100)
    refused = mz("push", str(src), "org/onnx:v1", server=served)
    one_error_line(refused, 1, "no weights", "config.json", "model.onnx", "--allow-no-weights")
    assert mz("ls", server=served).stdout == ""  # nothing stored
    allowed = mz("push", str(src), "org/onnx:v1", "--allow-no-weights", "--json", server=served)
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["tensors"] == 0


# 2. pull -o into a folder that is not empty ---------------------------------------------------------


def test_pull_refuses_a_foreign_folder_and_updates_its_own_in_place(served: str, tmp_path: Path) -> None:
    mz("push", str(_model(tmp_path / "a", 1)), "org/a:v1", server=served)
    mz("push", str(_model(tmp_path / "a2", 2, {"extra.txt": "v2 only"})), "org/a:v2", server=served)
    mz("push", str(_model(tmp_path / "b", 3)), "org/b:v1", server=served)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    (mine / "pytorch_model.bin").write_bytes(b"old weights")
    refused = mz("pull", "org/a:v1", "-o", str(mine), server=served)
    one_error_line(refused, 1, "not empty", "notes.txt", "--force")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "pytorch_model.bin"]  # untouched

    forced = mz("pull", "org/a:v1", "-o", str(mine), "--force", "--json", server=served)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["stale"] == ["pytorch_model.bin"]  # said, and left
    assert (mine / "notes.txt").read_text() == "the user's own file" and (mine / "pytorch_model.bin").exists()
    cleaned = mz("pull", "org/a:v1", "-o", str(mine), "--force", "--clean", server=served)
    assert cleaned.returncode == 0 and "removed (--clean): pytorch_model.bin" in cleaned.stdout
    assert not (mine / "pytorch_model.bin").exists() and (mine / "notes.txt").exists()

    out = tmp_path / "out"
    assert mz("pull", "org/a:v2", "-o", str(out), server=served).returncode == 0
    assert (out / "extra.txt").exists()
    back = mz("pull", "org/a:v1", "-o", str(out), server=served)  # same model: updated in place
    assert back.returncode == 0, back.stderr
    assert "removed (from the earlier pull): extra.txt" in back.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    other = mz("pull", "org/b:v1", "-o", str(out), server=served)  # another model into it
    one_error_line(other, 1, "holds a pull of org/a")


# 3. cache prune units -----------------------------------------------------------------------------------


def test_cache_prune_needs_units_and_has_a_dry_run(served: str, tmp_path: Path) -> None:
    mz("push", str(_model(tmp_path / "a", 1)), "org/a:v1", server=served)
    assert mz("pull", "org/a:v1", "-o", str(tmp_path / "out"), server=served).returncode == 0
    cache = Path(os.environ["MZSTORE_HOME"]) / "cache" / "chunks"
    before = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert before
    for args, word in ((("--max-size", "20"), "give a unit"), (("--older-than", "7"), "give a unit")):
        one_error_line(mz("cache", "prune", *args), 2, word, args[0])
    dry = mz("cache", "prune", "--all", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["dry_run"] is True
    assert len(json.loads(dry.stdout)["removed"]) >= len(before)
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == before  # nothing removed
    assert mz("cache", "prune", "--max-size", "0B").returncode == 0
    assert not [p for p in cache.rglob("*") if p.is_file()]


# 4. one line instead of a traceback ---------------------------------------------------------------------


def test_expected_failures_are_one_line(served: str, tmp_path: Path) -> None:
    mz("push", str(_model(tmp_path / "a", 1)), "org/a:v1", server=served)
    one_error_line(mz("pull", "org/a:v1", "-o", str(UNWRITABLE), server=served), 1, str(UNWRITABLE))
    one_error_line(mz("serve", "--root", "/sys/kernel"), 1, "/sys/kernel")
    one_error_line(mz("serve", "--listen", "0.0.0.0:99999"), 2, "0 to 65535")
    one_error_line(mz("pull", "org/a:v1", "--tp-size", "2", "--keep-quantized", server=served), 2, "cannot be combined")


def test_ctrl_c_while_the_commands_load_is_one_line(tmp_path: Path) -> None:
    """A KeyboardInterrupt raised by the import of a command module: 'interrupted', exit 130."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mzstore.cli.transfer':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, _Interrupt())\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = mz("ls", env={"PYTHONPATH": pythonpath})
    assert result.returncode == 130 and result.stderr == "interrupted\n", result.stderr


# 7. offline --------------------------------------------------------------------------------------------------


def test_a_cached_tag_is_pulled_with_the_server_down(tmp_path: Path) -> None:
    address, proc = start_serve(tmp_path / "data", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        mz("push", str(_model(tmp_path / "a", 1)), "org/a:v1", server=address)
        assert mz("pull", "org/a:v1", "-o", str(tmp_path / "first"), server=address).returncode == 0
    finally:
        stop_serve(proc)
    again = mz("pull", "org/a:v1", "-o", str(tmp_path / "again"), "--json", server=address)
    assert again.returncode == 0, again.stderr
    assert "may be stale" in again.stderr and again.stderr.count("\n") == 1
    assert json.loads(again.stdout)["bytes_transferred"] == 0
    offline = mz("pull", "org/a:v1", "-o", str(tmp_path / "offline"), "--offline", server=address)
    assert offline.returncode == 0 and offline.stderr == ""  # asked for: no warning
    one_error_line(mz("pull", "org/other:v1", "--offline", server=address), 1, "not in the local cache")
    same = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert all((tmp_path / d / "model.safetensors").read_bytes() == same for d in ("first", "again", "offline"))


# 8. server addresses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,want",
    [
        ("localhost", "localhost:50051"),
        ("10.0.0.7:9000", "10.0.0.7:9000"),
        ("http://host:8080", "host:8080"),
        ("grpc://host", "host:50051"),
        ("[::1]", "[::1]:50051"),
        ("[::1]:7000", "[::1]:7000"),
        ("::1", "[::1]:50051"),
        ("unix:/run/mzstore.sock", "unix:/run/mzstore.sock"),
    ],
)
def test_server_addresses_default_the_port(text: str, want: str) -> None:
    assert server_address(text) == want


def test_url_forms_of_the_server_work_and_tls_urls_are_explained(served: str) -> None:
    port = served.rsplit(":", 1)[1]
    assert mz("ls", "--server", f"http://127.0.0.1:{port}").returncode == 0
    one_error_line(mz("ls", "--server", f"https://127.0.0.1:{port}"), 2, "--tls-ca")
    one_error_line(mz("ls", "--server", "127.0.0.1:99999"), 2, "1 to 65535")
    one_error_line(mz("ls", "--server", f"127.0.0.1:{free_port()}"), 1, "cannot reach")


# 10. what a digest pull says ------------------------------------------------------------------------------------


def test_a_digest_pull_says_what_was_asked(served: str, tmp_path: Path) -> None:
    pushed = json.loads(mz("push", str(_model(tmp_path / "a", 1)), "org/a:v1", "--json", server=served).stdout)
    ref = f"org/a@{pushed['digest']}"
    result = mz("pull", ref, "-o", str(tmp_path / "out"), server=served)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first == f"pulled {ref} → {tmp_path / 'out'}"  # no ':latest', the digest once


# 11. usage errors ---------------------------------------------------------------------------------------------------


def test_usage_errors_exit_2_in_one_line(served: str, tmp_path: Path) -> None:
    pushed = json.loads(mz("push", str(_model(tmp_path / "a", 1)), "org/a:v1", "--json", server=served).stdout)
    one_error_line(mz("rm", f"org/a@{pushed['digest']}", server=served), 2, "rm removes a tag")
    one_error_line(mz("tag", "org/a:v1", f"org/b@{pushed['digest']}", server=served), 2, "not a digest")
    one_error_line(mz("push", "--no-such-flag"), 2, "no-such-flag")
    one_error_line(mz("pull", "Bad Name"), 2)
    assert [line.split()[0] for line in mz("ls", server=served).stdout.splitlines()[1:]] == ["org/a:v1"]


# 13. admin commands on a root that does not exist -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["fsck", "gc", "rebalance"])
def test_admin_commands_refuse_a_root_that_does_not_exist(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "typo"
    one_error_line(mz(command, "--root", str(missing)), 1, "no store at", str(missing))
    assert not missing.exists()


# 12. ls and inspect ----------------------------------------------------------------------------------------------


def test_ls_has_columns_takes_a_tag_and_inspect_marks_cut_names(served: str, tmp_path: Path) -> None:
    src = _model(tmp_path / "a", 1)
    long_name = "model.encoder.layers.0.attention.self.query_key_value.weight"
    save_file({long_name: torch.zeros(8, 8), "w": torch.ones(4)}, str(src / "model.safetensors"))
    pushed = json.loads(mz("push", str(src), "org/a:v1", "--json", server=served).stdout)
    mz("tag", "org/a:v1", "org/a:v2", server=served)
    lines = mz("ls", server=served).stdout.splitlines()
    assert lines[0].split() == ["REF", "DIGEST", "SIZE", "STORED", "UPDATED"]
    assert [line.split()[0] for line in lines[1:]] == ["org/a:v1", "org/a:v2"]
    row = lines[1].split()
    assert row[1] == pushed["digest"][: len("sha256:") + 12] and lines[1].rstrip().endswith("just now")
    assert " ".join(row[2:4]) == human(pushed["bytes_raw"])  # SIZE: the source's bytes
    assert float(row[4]) > 0  # STORED
    only = mz("ls", "org/a:v2", server=served).stdout.splitlines()
    assert [line.split()[0] for line in only[1:]] == ["org/a:v2"]
    one_error_line(mz("ls", "org/a:v9", server=served), 1, "org/a:v9 not found")
    one_error_line(mz("ls", f"org/a@{pushed['digest']}", server=served), 2, "mzstore inspect")
    listed = json.loads(mz("ls", "--json", server=served).stdout)
    assert listed == {"refs": [{"name": "org/a", "tag": t, "digest": pushed["digest"]} for t in ("v1", "v2")]}
    assert mz("ls", "org/none", server=served).stdout == ""  # nothing: no header either
    shown = mz("inspect", "org/a:v1", server=served).stdout
    assert long_name[:47] + "…" in shown and long_name not in shown


# 9. registry-style refs ---------------------------------------------------------------------------------------------


def test_a_host_port_prefix_selects_the_server(served: str, tmp_path: Path) -> None:
    mz("push", str(_model(tmp_path / "a", 1)), f"{served}/org/a:v1")  # no MZSTORE_SERVER: the ref says where
    out = tmp_path / "out"
    assert mz("pull", f"{served}/org/a:v1", "-o", str(out)).returncode == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert mz("ls", f"{served}/org/a").stdout.splitlines()[1].split()[0] == "org/a:v1"
    one_error_line(mz("pull", f"{served}/org/a:v1", "--server", "127.0.0.1:1"), 2, "--server says")
    one_error_line(mz("tag", f"{served}/org/a:v1", "localhost:1/org/a:v2"), 2, "different servers")


# 15. --quiet, --include/--exclude, --version, completion ------------------------------------------------------------


def test_quiet_include_exclude_version_and_completion(served: str, tmp_path: Path) -> None:
    src = _model(tmp_path / "a", 1, {"notes.txt": "not part of the model", "tokenizer.json": "{}"})
    digest = mz("push", str(src), "org/a:v1", "--exclude", "*.txt", "-q", server=served)
    assert digest.returncode == 0 and digest.stdout.strip().startswith("sha256:") and digest.stderr == ""
    files = [
        f["path"] for f in json.loads(mz("inspect", "org/a:v1", "--json", server=served).stdout)["manifest"]["files"]
    ]
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json"]
    out = tmp_path / "out"
    quiet = mz(
        "pull", "org/a:v1", "-o", str(out), "--include", "*.json", "--exclude", "tokenizer*", "-q", server=served
    )
    assert quiet.returncode == 0 and quiet.stdout == f"{out}\n"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json"]
    one_error_line(
        mz("pull", "org/a:v1", "-o", str(tmp_path / "n"), "--include", "*.onnx", server=served), 1, "matches"
    )

    from mzstore.cli.base import SPEAKS
    from mzstore.codecs import KNOWN_CODECS
    from mzstore.codecs.lossless import MAGIC as LOSSLESS_MAGIC
    from mzstore.codecs.quant import MAGIC as QUANT_MAGIC
    from mzstore.format.manifest import SCHEMA

    version = mz("--version").stdout
    assert all(value in version for value in SPEAKS.values())
    assert SPEAKS["manifest"] == SCHEMA
    assert LOSSLESS_MAGIC.decode() in SPEAKS["codecs"] and QUANT_MAGIC.decode() in SPEAKS["codecs"]
    assert all(name in SPEAKS["codecs"] for name in KNOWN_CODECS)
    completion = mz(env={"_MZSTORE_COMPLETE": "bash_source"})
    assert completion.returncode == 0 and "_mzstore_completion" in completion.stdout


# 5, 6, 14 from the command line -------------------------------------------------------------------------------------


def test_cli_re_push_keep_quantized_figures_and_tp_warnings(served: str, tmp_path: Path) -> None:
    src = tmp_path / "q"
    src.mkdir()
    gen = torch.Generator().manual_seed(4)
    save_file(
        {"model.layers.0.self_attn.q_proj.weight": torch.randn(768, 256, generator=gen).to(torch.bfloat16)},
        str(src / "model.safetensors"),
    )
    (src / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 12}))
    first = json.loads(mz("push", str(src), "org/q:v1", "--codec", "int8", "--json", server=served).stdout)
    again = json.loads(mz("push", str(src), "org/q:v2", "--codec", "int8", "--json", server=served).stdout)
    assert first["bytes_transferred"] > 300_000 and again["bytes_transferred"] == 0  # 5: nothing sent again
    assert again["digest"] == first["digest"]

    pulls = []
    for out in ("kq1", "kq2"):  # 6: a keep-quantized pull goes through the cache; it reports what it wrote
        pulled = mz("pull", "org/q:v1", "-o", str(tmp_path / out), "--keep-quantized", "--json", server=served)
        assert pulled.returncode == 0, pulled.stderr
        pulls.append(json.loads(pulled.stdout))
    written = sum((tmp_path / "kq1" / f).stat().st_size for f in ("model.safetensors", "config.json"))
    assert pulls[0]["bytes_raw"] == written < first["bytes_raw"]
    assert pulls[1]["bytes_transferred"] == 0 and pulls[1]["bytes_cached"] > 0

    split = mz("pull", "org/q:v1", "-o", str(tmp_path / "tp"), "--tp-size", "8", "--tp-rank", "0", server=served)
    assert split.returncode == 0  # 14: a split that cuts heads is done, and said in one line
    warning = [line for line in split.stderr.splitlines() if line.startswith("warning:")]
    assert warning == [
        "warning: tensor-parallel size 8: num_attention_heads 12 is not split evenly over 8 ranks: "
        "ranks get parts of heads",
        "warning: tensor-parallel size 8: num_key_value_heads 12 is not split evenly over 8 ranks: "
        "ranks get parts of heads",
    ]
