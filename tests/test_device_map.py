"""load_into and device maps: planning rules (pure), loads into real models, pinned staging on CUDA.

The planner works on device *labels*, so its rules are tested over any
names; loads on this machine use ``"cpu"`` (and ``"cpu:N"`` labels, which
torch accepts and places on the CPU). The CUDA tests run where a GPU is
present and compare against the CPU result bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import IntegrityError, InvalidArgument
from mzstore.pull.device import DeviceMapSink, DeviceStateDictSink, PinnedStaging
from mzstore.pull.device_map import balanced_split, blocks_of, match_prefix, name_mapping, plan_devices
from mzstore.server.app import build_server

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)
SENTENCES = ["The cat sits on the mat.", "mzstore keeps models small.", "A third, somewhat longer sentence here."]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8) if t.numel() else t.detach().reshape(-1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a.cpu()), _bits(b.cpu()))


# --- planning (pure) -------------------------------------------------------------------------------


def test_longest_prefix_on_dotted_boundaries() -> None:
    keys = {"", "encoder", "encoder.layer.1", "pooler.dense"}
    assert match_prefix("encoder.layer.1.attention.self.query.weight", keys) == "encoder.layer.1"
    assert match_prefix("encoder.layer.10.attention.self.query.weight", keys) == "encoder"
    assert match_prefix("encoder.layer.1", keys) == "encoder.layer.1"
    assert match_prefix("encoderx.weight", keys) == ""
    assert match_prefix("pooler.dense_extra.weight", keys) == ""
    assert match_prefix("pooler.dense.weight", {"pooler"}) == "pooler"
    assert match_prefix("embeddings.weight", {"encoder"}) is None

    sizes = {
        "embeddings.word.weight": 10,
        "encoder.layer.1.q.weight": 1,
        "encoder.layer.10.q.weight": 1,
        "encoder.layer.2.q.weight": 1,
        "pooler.dense.weight": 1,
    }
    placement = plan_devices(sizes, {"": "cpu", "encoder.": "cuda:0", "encoder.layer.1": 1})
    assert placement == {
        "embeddings.word.weight": "cpu",
        "encoder.layer.1.q.weight": "cuda:1",  # an int is a CUDA index, as in accelerate
        "encoder.layer.10.q.weight": "cuda:0",  # "encoder.layer.1" does not match layer 10
        "encoder.layer.2.q.weight": "cuda:0",
        "pooler.dense.weight": "cpu",
    }


def test_unmatched_tensors_are_named_in_the_error() -> None:
    sizes = {f"encoder.layer.{i}.w": 1 for i in range(8)} | {"pooler.w": 1}
    with pytest.raises(InvalidArgument, match=r"2 tensor\(s\): encoder\.layer\.7\.w, pooler\.w"):
        plan_devices(sizes, {f"encoder.layer.{i}": "cpu" for i in range(7)})


def test_one_device_forms_and_refusals() -> None:
    sizes = {"a.w": 1, "b.w": 2}
    assert plan_devices(sizes) == {"a.w": "cpu", "b.w": "cpu"}
    assert plan_devices(sizes, "cuda:1") == {"a.w": "cuda:1", "b.w": "cuda:1"}
    assert plan_devices(sizes, 0) == {"a.w": "cuda:0", "b.w": "cuda:0"}
    assert plan_devices(sizes, torch.device("cpu")) == {"a.w": "cpu", "b.w": "cpu"}
    for bad in ("disk", "meta", {"": "disk"}, -1, "auto"):
        with pytest.raises(InvalidArgument):
            plan_devices(sizes, bad)


def _llama_sizes(layers: int = 8) -> dict[str, int]:
    sizes = {"model.embed_tokens.weight": 400}
    for i in range(layers):
        sizes |= {
            f"model.layers.{i}.self_attn.q_proj.weight": 40,
            f"model.layers.{i}.mlp.experts.0.w1.weight": 30,
            f"model.layers.{i}.mlp.experts.1.w1.weight": 30,
            f"model.layers.{i}.input_layernorm.weight": 1,
        }
    return sizes | {"model.norm.weight": 1, "lm_head.weight": 400}


def test_blocks_keep_layers_and_modules_whole() -> None:
    names = list(_llama_sizes(2))
    assert dict(zip(names, blocks_of(names), strict=True)) == {
        "model.embed_tokens.weight": "model.embed_tokens",
        "model.layers.0.self_attn.q_proj.weight": "model.layers.0",
        "model.layers.0.mlp.experts.0.w1.weight": "model.layers.0",  # experts stay with their layer
        "model.layers.0.mlp.experts.1.w1.weight": "model.layers.0",
        "model.layers.0.input_layernorm.weight": "model.layers.0",
        "model.layers.1.self_attn.q_proj.weight": "model.layers.1",
        "model.layers.1.mlp.experts.0.w1.weight": "model.layers.1",
        "model.layers.1.mlp.experts.1.w1.weight": "model.layers.1",
        "model.layers.1.input_layernorm.weight": "model.layers.1",
        "model.norm.weight": "model.norm",
        "lm_head.weight": "lm_head",
    }
    # A sentence-transformers model: "0." is a lone module index, not a list of layers; the
    # embeddings module (whose forward adds its tables) is one block.
    st = [
        "0.model.embeddings.position_ids",
        "0.model.embeddings.word_embeddings.weight",
        "0.model.embeddings.LayerNorm.weight",
        "0.model.encoder.layer.0.attention.self.query.weight",
        "0.model.encoder.layer.1.attention.self.query.weight",
        "0.model.pooler.dense.weight",
    ]
    assert blocks_of(st) == [
        "0.model.embeddings",
        "0.model.embeddings",
        "0.model.embeddings",
        "0.model.encoder.layer.0",
        "0.model.encoder.layer.1",
        "0.model.pooler",
    ]
    # No list of layers: modules below the path every name shares.
    assert blocks_of(["net.fc1.weight", "net.fc1.bias", "net.fc2.weight"]) == ["net.fc1", "net.fc1", "net.fc2"]


def test_balanced_split_is_even_and_contiguous() -> None:
    assert balanced_split([1, 1, 1, 1], 3) in ([0, 1, 2], [0, 1, 3], [0, 2, 3])
    assert balanced_split([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert balanced_split([5], 3) == [0, 1, 1]  # more devices than blocks: some get nothing
    assert balanced_split([], 2) == [0, 0]
    # A tiny block first does not get a device to itself.
    assert balanced_split([1, 470, 20, 18, 18, 18, 18, 18, 18, 1], 3) == [0, 2, 5]


def test_balanced_placement_over_labels() -> None:
    sizes = _llama_sizes(8)
    placement = plan_devices(sizes, "balanced", devices=["gpu-a", "gpu-b", "gpu-c"])
    order = {"gpu-a": 0, "gpu-b": 1, "gpu-c": 2}
    seq = [order[placement[n]] for n in sizes]
    assert seq == sorted(seq), "devices take consecutive runs in model order"
    for i in range(8):
        assert len({placement[n] for n in sizes if n.startswith(f"model.layers.{i}.")}) == 1
    totals = {d: sum(s for n, s in sizes.items() if placement[n] == d) for d in order}
    assert totals == {"gpu-a": 602, "gpu-b": 505, "gpu-c": 502}  # embeddings + 2 layers, 5 layers, 1 + head
    with pytest.raises(InvalidArgument, match="needs devices"):
        plan_devices(sizes, "balanced")
    with pytest.raises(InvalidArgument, match="repeat"):
        plan_devices(sizes, "balanced", devices=["cuda:0", 0])


def test_name_mapping() -> None:
    model = ["0.model.embeddings.word.weight", "0.model.encoder.layer.0.q.weight", "0.model.pooler.w"]
    ckpt = ["embeddings.word.weight", "encoder.layer.0.q.weight", "pooler.w"]
    found = name_mapping(ckpt, model)
    assert found.add == "0.model." and found("pooler.w") == "0.model.pooler.w"
    assert name_mapping(ckpt, ckpt).add == "" and name_mapping(ckpt, ckpt).strip == ""
    stripped = name_mapping(["bert." + n for n in ckpt], ckpt)
    assert stripped.strip == "bert." and stripped("bert.pooler.w") == "pooler.w" and stripped("x.w") is None
    assert name_mapping(ckpt, model, prefix="").add == ""  # explicit: as stored


# --- loads into real models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_client(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[Client]:
    """One server for the module with MiniLM pushed lossless (``m:1``) and int8 (``m:int8``)."""
    running = build_server(tmp_path_factory.mktemp("device-map") / "store", "127.0.0.1:0")
    with Client(running.address, timeout=60) as c:
        c.push(minilm_dir, "m:1")
        c.push(minilm_dir, "m:int8", codec="int8")
        yield c
    running.stop(grace=1)


def _meta_bert(minilm_dir: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(AutoConfig.from_pretrained(str(minilm_dir)))


def test_sentence_transformer_built_on_meta_gives_the_original_embeddings(
    minilm_client: Client, minilm_dir: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    original = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    model[0].model = _meta_bert(minilm_dir)  # the transformer, built on the meta device
    assert all(p.is_meta for p in model.parameters())

    report = minilm_client.load_into(model, "m:1")

    assert report["names"] == "with '0.model.'"  # checkpoint names found under the wrapper's prefix
    assert report["missing"] == [] and report["unexpected"] == []
    assert list(report["devices"]) == ["cpu"] and report["devices"]["cpu"]["tensors"] == 104
    assert not any(p.is_meta for p in model.parameters())
    # The checkpoint holds the old persistent position_ids, so that non-persistent buffer is set;
    # token_type_ids is not stored anywhere and stays on meta, as the report says.
    assert not model[0].model.embeddings.position_ids.is_meta
    assert report["meta"] == ["0.model.embeddings.token_type_ids"]
    emb = model[0].model.embeddings
    emb.token_type_ids = torch.zeros(emb.position_ids.shape, dtype=torch.long)
    model.eval()
    assert torch.equal(model.encode(SENTENCES, convert_to_tensor=True), original)


def test_meta_model_balanced_over_devices_matches_from_pretrained(minilm_client: Client, minilm_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    reference = AutoModel.from_pretrained(str(minilm_dir)).eval()
    model = _meta_bert(minilm_dir)
    report = minilm_client.load_into(model, "m:1", device_map="balanced", devices=["cpu:0", "cpu:1", "cpu:2"])

    assert list(report["devices"]) == ["cpu:0", "cpu:1", "cpu:2"]
    assert report["devices"]["cpu:0"]["tensors"] == 6  # the embeddings module, whole
    layer_totals = [report["devices"][d]["bytes"] for d in ("cpu:1", "cpu:2")]
    assert abs(layer_totals[0] - layer_totals[1]) < 2_000_000  # three layers each, about
    assert not any(t.is_meta for t in model.parameters())
    for name, p in model.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and p.device.type == "cpu", name
    batch = AutoTokenizer.from_pretrained(str(minilm_dir))(SENTENCES, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, reference(**batch).last_hidden_state)


def test_device_map_dict_into_a_normal_model(minilm_client: Client, minilm_dir: Path) -> None:
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.from_pretrained(str(minilm_dir)))  # random weights, on the CPU
    expected = minilm_client.load_state_dict("m:1")
    device_map = {"": "cpu", "encoder.layer.1": "cpu:1", "encoder.layer.10": "cpu:2"}
    report = minilm_client.load_into(model, "m:1", device_map=device_map)

    assert report["devices"]["cpu:1"]["tensors"] == 16  # layer 1 only: "encoder.layer.10" matches nothing
    assert "cpu:2" not in report["devices"]
    state = model.state_dict()
    for name, tensor in expected.items():
        if name in state:
            assert _same(state[name], tensor), name
    assert torch.equal(model.embeddings.position_ids, expected["embeddings.position_ids"])


def test_int8_checkpoint_loads_the_values_load_state_dict_gives(minilm_client: Client, minilm_dir: Path) -> None:
    expected = minilm_client.load_state_dict("m:int8")
    for expand_on_device in (None, True):  # the host decoder, and torch expansion (the GPU path) on the CPU
        model = _meta_bert(minilm_dir)
        minilm_client.load_into(model, "m:int8", expand_on_device=expand_on_device)
        for name, tensor in model.state_dict().items():
            assert _same(tensor, expected[name]), (expand_on_device, name)


def test_strict_names_missing_and_unexpected_keys_before_fetching(
    small_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(3)
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {"fc1.weight": torch.randn(64, 32, generator=gen), "extra.weight": torch.randn(8, 8, generator=gen)},
        str(src / "model.safetensors"),
    )
    small_client.push(src, "s/m:1")
    fetched: list[int] = []
    real = small_client.fetch

    def counting(blob: str, offset: int, length: int) -> bytearray:
        fetched.append(length)
        return real(blob, offset, length)

    monkeypatch.setattr(small_client, "fetch", counting)

    def build() -> torch.nn.Module:
        with torch.device("meta"):
            return _Two()

    with pytest.raises(
        InvalidArgument, match=r"missing from the checkpoint: fc2\.weight, fc2\.bias.*not in the model: extra\.weight"
    ):
        small_client.load_into(build(), "s/m:1")
    assert fetched == []  # refused before any byte moved

    model = build()
    report = small_client.load_into(model, "s/m:1", strict=False)
    assert report["missing"] == ["fc2.weight", "fc2.bias"] and report["unexpected"] == ["extra.weight"]
    assert report["meta"] == ["fc2.weight", "fc2.bias"]
    assert not model.fc1.weight.is_meta
    assert sum(fetched) < 64 * 32 * 4 + 100  # extra.weight was not fetched

    with torch.device("meta"):
        wrong = torch.nn.Module()
        wrong.fc1 = torch.nn.Linear(16, 64, bias=False)
    with pytest.raises(
        InvalidArgument, match=r"shapes differ.*fc1\.weight \(model \[64, 16\], checkpoint \[64, 32\]\)"
    ):
        small_client.load_into(wrong, "s/m:1", strict=False)


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64, bias=False)
        self.fc2 = torch.nn.Linear(64, 8)


class _TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(300, 32)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(3)])
        self.lm_head = torch.nn.Linear(32, 300, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in most causal LMs


def test_tied_weights_stay_one_tensor(small_client: Client, tmp_path: Path) -> None:
    source = _TiedLM()
    src = tmp_path / "tied"
    src.mkdir()
    # Checkpoints store a tied tensor once (safetensors refuses shared storage).
    save_file({k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}, str(src / "model.safetensors"))
    small_client.push(src, "t/m:1")

    with torch.device("meta"):
        model = _TiedLM()
    report = small_client.load_into(model, "t/m:1", device_map={"": "cpu", "lm_head": "cpu:1"})

    assert report["tied"] == {"lm_head.weight": "embed.weight"} and report["missing"] == []
    assert model.lm_head.weight is model.embed.weight  # not two parameters after assign=True
    assert torch.equal(model.embed.weight, source.embed.weight)
    assert len(list(model.parameters())) == len(list(source.parameters()))
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.lm_head(model.embed(x)), source.lm_head(source.embed(x)))

    built = _TiedLM()  # materialized: the shared tensor is filled in place, once, and stays shared
    shared = built.embed.weight
    report = small_client.load_into(built, "t/m:1")
    assert "embed.weight" in report["in_place"] and "lm_head.weight" not in report["in_place"]
    assert built.embed.weight is shared and built.lm_head.weight is shared
    assert torch.equal(shared, source.embed.weight)
    assert torch.equal(built.lm_head(built.embed(x)), source.lm_head(source.embed(x)))


def test_compact_chunks_decode_on_the_host_for_cpu_tensors(small_client: Client, tmp_path: Path) -> None:
    """A map mixing the CPU with a GPU gets compact chunks for every tensor; the CPU part decodes them."""
    gen = torch.Generator().manual_seed(5)
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {
            "layers.0.q_proj.weight": torch.randn(192, 256, generator=gen).to(torch.bfloat16),
            "layers.1.mlp.weight": torch.randn(300, 128, generator=gen),
            "norm.weight": torch.ones(256),
        },
        str(src / "model.safetensors"),
    )
    small_client.push(src, "c/m:1", codec="int8")
    expected = small_client.load_state_dict("c/m:1")
    _, _, manifest = small_client.manifest("c/m:1")
    placement = {"layers.0.q_proj.weight": "cpu", "layers.1.mlp.weight": "cpu:1", "norm.weight": "cpu"}
    sink = DeviceMapSink(manifest, placement)
    assert not sink.compact_codecs
    sink.compact_codecs = DeviceStateDictSink.compact_codecs  # as when one of the devices is a GPU
    got, _ = small_client.puller().run(manifest, sink)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert _same(got[name], tensor), name


class _FakeStream:
    def __init__(self, device: object = None) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _FakeEvent:
    def record(self, stream: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("policy", ["lossless", "int8", "int4", "fp8", "prune:0.5", "prune:2:4,int4:g64"])
def test_staging_bookkeeping_without_a_gpu(
    small_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """The staging path (packed uploads, typed views, buffer hand-off) on the CPU, CUDA calls stubbed.

    Synchronization itself needs a GPU (the CUDA tests below); this keeps the
    bookkeeping honest where CI runs.
    """
    from mzstore.pull import device as dev

    gen = torch.Generator().manual_seed(11)
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {
            "q.weight": torch.randn(192, 256, generator=gen).to(torch.bfloat16) * 0.05,
            "o.weight": torch.randn(256, 200, generator=gen).to(torch.float16) * 0.02,
            "mlp.weight": torch.randn(300, 128, generator=gen) * 0.1,
            "mlp.bias": torch.randn(300, generator=gen),
        },
        str(src / "model.safetensors"),
    )
    small_client.push(src, "f/m:1", codec=policy)
    expected = small_client.load_state_dict("f/m:1")

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    monkeypatch.setattr(PinnedStaging, "pin", False)
    used = {"copy": 0, "upload": 0}
    copy, upload = PinnedStaging.copy, PinnedStaging.upload

    def counted_copy(self: PinnedStaging, *a: object) -> None:
        used["copy"] += 1
        copy(self, *a)  # type: ignore[arg-type]

    def counted_upload(self: PinnedStaging, *a: object) -> list[object]:
        used["upload"] += 1
        return upload(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(PinnedStaging, "copy", counted_copy)
    monkeypatch.setattr(PinnedStaging, "upload", counted_upload)
    init = dev.DeviceStateDictSink.__init__

    def staged_init(self: DeviceStateDictSink, *a: object, **k: object) -> None:
        init(self, *a, **k)  # type: ignore[arg-type]
        self._staging = PinnedStaging()

    monkeypatch.setattr(dev.DeviceStateDictSink, "__init__", staged_init)
    got = small_client.load_state_dict("f/m:1", expand_on_device=True, workers=3)
    assert used["copy"] > 0 and (used["upload"] > 0) == (policy != "lossless")
    for name, tensor in expected.items():
        assert _same(got[name], tensor), name


# --- CUDA: pinned staging, GPU targets (run where a GPU is present) --------------------------------


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(7)
    tensors = {
        "embed.weight": torch.randn(1000, 96, generator=gen).to(torch.bfloat16),
        "layers.0.q_proj.weight": torch.randn(192, 256, generator=gen).to(torch.bfloat16) * 0.05,
        "layers.0.o_proj.weight": torch.randn(256, 200, generator=gen).to(torch.float16) * 0.02,
        "layers.1.mlp.weight": torch.randn(300, 128, generator=gen) * 0.1,
        "layers.1.mlp.bias": torch.randn(300, generator=gen),
        "norm.weight": torch.ones(256),
        "steps": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "src"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


class _Holder(torch.nn.Module):
    """A module with one buffer per checkpoint tensor (names with dots become submodules)."""

    def __init__(self, shapes: dict[str, tuple[torch.Size, torch.dtype]], device: str = "meta") -> None:
        super().__init__()
        for name, (shape, dtype) in shapes.items():
            owner: torch.nn.Module = self
            *path, attr = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_buffer(attr, torch.zeros(shape, dtype=dtype, device=device))


def _slot(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("policy", "expand_on_device"), [("lossless", None), ("int8", None), ("int8", True)])
def test_a_built_model_is_filled_in_place(
    small_client: Client, mixed_dir: Path, policy: str, expand_on_device: bool | None
) -> None:
    """Tensors already in memory with the checkpoint's dtype and shape are decoded into; the rest are assigned."""
    small_client.push(mixed_dir, "p/m:1", codec=policy)
    expected = small_client.load_state_dict("p/m:1")
    model = _Holder({k: (v.shape, v.dtype) for k, v in expected.items()}, device="cpu")
    model.get_submodule("layers.1.mlp").bias = torch.zeros(300, dtype=torch.float64)  # another dtype
    model.get_submodule("layers.0.q_proj").weight = torch.zeros(
        256, 192, dtype=torch.bfloat16
    ).t()  # strided: not one block
    before = {name: (t, t.data_ptr()) for name, t in model.state_dict(keep_vars=True).items()}
    moved = {"layers.1.mlp.bias", "layers.0.q_proj.weight"}

    report = small_client.load_into(model, "p/m:1", expand_on_device=expand_on_device)

    assert set(report["in_place"]) == set(expected) - moved
    for name, tensor in expected.items():
        now = _slot(model, name)
        assert _same(now, tensor), name  # the checkpoint's values and dtype either way
        old, address = before[name]
        if name in moved:
            assert now is not old and now.data_ptr() != address, name
        else:
            assert now is old and now.data_ptr() == address, name  # the same tensor, the same memory


def _push_two(client: Client, tmp_path: Path, ref: str) -> _Two:
    """A freshly initialized :class:`_Two`, pushed as ``ref``."""
    source = _Two()
    src = tmp_path / "two"
    src.mkdir()
    save_file(source.state_dict(), str(src / "model.safetensors"))
    client.push(src, ref)
    return source


def test_parameters_keep_their_identity_and_the_optimizer_still_holds_them(
    small_client: Client, tmp_path: Path
) -> None:
    source = _push_two(small_client, tmp_path, "o/m:1")

    model = _Two()
    model.fc2.bias.requires_grad_(False)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = (model.fc1(torch.randn(2, 32, requires_grad=True)) ** 2).sum()  # the graph holds fc1.weight
    report = small_client.load_into(model, "o/m:1")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()  # autograd knows the weights changed under it, as after a copy_

    assert sorted(report["in_place"]) == sorted(source.state_dict())
    assert list(model.parameters()) == params and optimizer.param_groups[0]["params"] == params
    assert model.fc1.weight.requires_grad and not model.fc2.bias.requires_grad
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = torch.randn(4, 32)
    model.fc2(model.fc1(x)).sum().backward()  # still trainable, and the optimizer steps the loaded weights
    optimizer.step()
    assert not torch.equal(model.fc1.weight, source.fc1.weight)

    copy = _Two()
    report = small_client.load_into(copy, "o/m:1", in_place=False)
    assert report["in_place"] == [] and copy.fc1.weight is not params[0]
    assert torch.equal(copy.fc1.weight, source.fc1.weight)


def test_in_place_under_the_swap_tensors_flag(small_client: Client, tmp_path: Path) -> None:
    """With torch's swap-on-conversion flag, load_state_dict swaps each tensor with what it is given; a tensor
    filled in place is given itself, and must come out the same object with the loaded values."""
    source = _push_two(small_client, tmp_path, "w/m:1")
    model = _Two()
    weight = model.fc1.weight
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        report = small_client.load_into(model, "w/m:1")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert "fc1.weight" in report["in_place"] and model.fc1.weight is weight and weight.requires_grad
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_overlapping_tensors_are_not_filled_in_place() -> None:
    from mzstore.format.manifest import TensorEntry
    from mzstore.pull.load_into import in_place_targets

    base = torch.zeros(300)
    slots = {
        "a": base[0:100],
        "b": base[50:150],
        "c": base[200:300],
        "d": torch.zeros(10, 10).t(),
        "e": torch.zeros(10),
    }

    def entry(name: str, t: torch.Tensor, dtype: str = "F32") -> TensorEntry:
        size = t.numel() * (2 if dtype == "F16" else 4)
        return TensorEntry(
            file="f", name=name, dtype=dtype, shape=list(t.shape), data_offsets=[0, size], codec="raw", chunks=[]
        )

    loads = [(n, entry("ck." + n, t), "cpu") for n, t in slots.items()]
    loads[-1] = ("e", entry("ck.e", slots["e"], "F16"), "cpu")
    assert set(in_place_targets(slots, loads)) == {"ck.c"}  # a and b overlap, d is strided, e is another dtype
    assert in_place_targets(slots, [("c", entry("ck.c", slots["c"]), "cpu:1")]) == {"ck.c": slots["c"]}
    assert in_place_targets(slots, [("c", entry("ck.c", slots["c"]), "meta")]) == {}


@pytest.mark.parametrize("in_place", [True, False])
def test_a_failed_load_leaves_the_model_as_it_was_only_without_in_place(
    small_client: Client, mixed_dir: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    small_client.push(mixed_dir, "f/m:1")
    expected = small_client.load_state_dict("f/m:1")
    _, _, manifest = small_client.manifest("f/m:1")
    last = max(manifest.chunks(), key=lambda c: (c.blob, c.offset))
    real = small_client.fetch

    def corrupt(blob: str, offset: int, length: int) -> bytes:
        data = bytes(real(blob, offset, length))
        if blob == last.blob and offset <= last.offset < offset + length:
            i = last.offset - offset + last.length // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        return data

    monkeypatch.setattr(small_client, "fetch", corrupt)
    monkeypatch.setattr(small_client.transport, "read_blob_again", corrupt)
    monkeypatch.setattr(small_client, "cache", None)  # every chunk is fetched
    model = _Holder({k: (v.shape, v.dtype) for k, v in expected.items()}, device="cpu")
    with pytest.raises(IntegrityError):
        small_client.load_into(model, "f/m:1", in_place=in_place, workers=1)
    changed = [n for n, t in model.state_dict().items() if t.any()]
    if in_place:
        assert changed  # filled part way: the documented cost of in place
    else:
        assert changed == []


@needs_cuda
def test_cuda_model_is_filled_in_place(small_client: Client, mixed_dir: Path) -> None:
    small_client.push(mixed_dir, "g/m:1", codec="int8")
    cpu = small_client.load_state_dict("g/m:1")
    model = _Holder({k: (v.shape, v.dtype) for k, v in cpu.items()}, device="cuda:0")
    before = {name: t.data_ptr() for name, t in model.state_dict().items()}
    report = small_client.load_into(model, "g/m:1")
    assert set(report["in_place"]) == set(cpu)
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == before[name] and _same(cpu[name], tensor), name


@needs_cuda
@pytest.mark.parametrize("policy", ["lossless", "int8", "int4", "fp8", "prune:2:4,int4:g64"])
def test_cuda_load_state_dict_and_load_into_match_cpu(small_client: Client, mixed_dir: Path, policy: str) -> None:
    small_client.push(mixed_dir, "g/m:1", codec=policy)
    cpu = small_client.load_state_dict("g/m:1")
    gpu = small_client.load_state_dict("g/m:1", device="cuda:0", workers=3)
    for name, tensor in cpu.items():
        assert gpu[name].device == torch.device("cuda:0") and _same(tensor, gpu[name]), name

    model = _Holder({k: (v.shape, v.dtype) for k, v in cpu.items()})
    report = small_client.load_into(model, "g/m:1", device_map={"": "cuda:0", "layers.1": "cpu"}, workers=3)
    assert set(report["devices"]) == {"cuda:0", "cpu"}
    state = model.state_dict()
    for name, tensor in cpu.items():
        want = "cpu" if name.startswith("layers.1.") else "cuda"
        assert state[name].device.type == want and _same(tensor, state[name]), name


@needs_two_gpus
@pytest.mark.parametrize("policy", ["lossless", "int8"])
def test_cuda_balanced_over_two_gpus_matches_cpu(small_client: Client, mixed_dir: Path, policy: str) -> None:
    small_client.push(mixed_dir, "g/m:1", codec=policy)
    cpu = small_client.load_state_dict("g/m:1")
    model = _Holder({k: (v.shape, v.dtype) for k, v in cpu.items()})
    report = small_client.load_into(model, "g/m:1", device_map="balanced", devices=["cuda:0", "cuda:1"])
    assert set(report["devices"]) == {"cuda:0", "cuda:1"}
    for name, tensor in model.state_dict().items():
        assert tensor.is_cuda and _same(cpu[name], tensor), name


@needs_cuda
def test_cuda_minilm_int8_load_into_matches_cpu(minilm_client: Client, minilm_dir: Path) -> None:
    expected = minilm_client.load_state_dict("m:int8")
    model = _meta_bert(minilm_dir)
    minilm_client.load_into(model, "m:int8", device_map="cuda:0")
    for name, tensor in model.state_dict().items():
        assert tensor.is_cuda and _same(tensor, expected[name]), name


@needs_cuda
def test_pinned_buffer_is_not_reused_while_its_copy_is_in_flight() -> None:
    """Many large async copies out of one thread's pinned buffer: each destination gets its own bytes."""
    staging = PinnedStaging()
    device = torch.device("cuda:0")
    size = 32 << 20
    dests = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(12)]
    stream = staging.stream(device)
    for i, dest in enumerate(dests):
        host = staging.buffer(size)
        assert host.is_pinned()
        host.fill_(i + 1)
        staging.copy(dest, size, stream)
    staging.finish()
    for i, dest in enumerate(dests):
        assert bool((dest == i + 1).all()), i
    arrays = [torch.arange(10, dtype=torch.float32).numpy(), torch.ones(3, 5, dtype=torch.bool).numpy()]
    floats, mask = staging.upload(arrays, device, stream)
    staging.finish()
    assert torch.equal(floats.cpu(), torch.arange(10, dtype=torch.float32)) and mask.dtype == torch.bool
    assert mask.shape == (3, 5) and bool(mask.all())
