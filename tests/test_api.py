"""The top-level API: lazy imports, and module-level functions that accept what ``Client`` accepts."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mzstore
from mzstore import api
from mzstore.client import Client
from mzstore.server.app import RunningServer

TWINS = ("pull", "push", "load_state_dict", "load_into")
#: Client options the module-level functions take besides the method's own. ``transport`` is left out:
#: a transport is a long-lived connection, so whoever holds one holds a Client.
CLIENT_OPTIONS = [p for p in inspect.signature(Client).parameters if p != "transport"]


@pytest.mark.parametrize("name", TWINS)
def test_module_functions_accept_every_option_of_their_client_method(name: str) -> None:
    method = inspect.signature(getattr(Client, name)).parameters
    function = inspect.signature(getattr(api, name)).parameters
    for pname, param in method.items():
        if pname == "self":
            continue
        assert pname in function, f"mzstore.{name} lacks {pname!r}, which Client.{name} takes"
        assert function[pname].default == param.default, f"mzstore.{name}({pname}=…) has another default"
        assert function[pname].kind == param.kind, f"mzstore.{name}({pname}) is passed differently"
    for option in CLIENT_OPTIONS:
        assert option in function, f"mzstore.{name} lacks the Client option {option!r}"
    assert getattr(mzstore, name) is getattr(api, name)


def test_module_functions_forward_their_options(server: RunningServer, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"model.q_proj.weight": torch.randn(256, 64, generator=gen)}, str(src / "model.safetensors"))
    info = mzstore.push(
        src, "api/m:v1", codec="int8", annotations={"fine-tuned-from": "org/base:v1"}, server=server.address
    )
    with Client(server.address) as c:
        assert c.manifest("api/m:v1")[2].annotations == {"fine-tuned-from": "org/base:v1"}
    assert info.worst is not None  # int8 reached the server
    sliced = mzstore.load_state_dict("api/m:v1", tp_size=2, tp_rank=1, server=server.address, cache=False)
    assert sliced["model.q_proj.weight"].shape == (128, 64)
    out = tmp_path / "out"
    pulled = mzstore.pull("api/m:v1", out, tp_size=2, tp_rank=0, server=server.address, cache=False)
    assert load_file(str(out / "model.safetensors"))["model.q_proj.weight"].shape == (128, 64)
    assert pulled.bytes_transferred > 0


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_mzstore_loads_no_grpc_numpy_or_torch() -> None:
    heavy = ("grpc", "numpy", "torch", "ml_dtypes", "fsspec", "google.protobuf")
    loaded = _fresh(f"import sys, json, mzstore; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    assert json.loads(loaded) == []
    assert _fresh("import mzstore; print(mzstore.Client.__module__)").strip() == "mzstore.client"


def test_mzstore_pull_stays_the_function_when_the_subpackage_is_imported() -> None:
    code = (
        "import mzstore, mzstore.pull.sinks, mzstore.push.upload; print(callable(mzstore.pull), callable(mzstore.push))"
    )
    assert _fresh(code).split() == ["True", "True"]
