"""The streaming loader and ``from_pretrained``: the same model as transformers loads, in the dtype and on the
device asked for, NF4 layers quantized while loading exactly as after loading, hub ids from the local cache, named
errors, and a host peak memory below the whole-model load's."""

from __future__ import annotations

import gc
import logging
import shutil

import pytest
import torch
import transformers

from ember.engine import ConfigError, LoRAConfig, from_pretrained
from ember.engine.data import model_folder
from ember.engine.loading import load_pretrained
from ember.engine.lora import LoRALinear, NF4Linear, apply_lora, select_targets
from ember.engine.patch import patch
from ember.kernels.backend import forced_backend


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _stock(folder, task="causal-lm", **kwargs):
    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]
    return auto.from_pretrained(folder, dtype=torch.float32, **kwargs)


def test_streaming_gives_the_model_transformers_loads(tiny_llama):
    streamed, stock = load_pretrained(tiny_llama, dtype=torch.float32), _stock(tiny_llama)
    ours, theirs = streamed.state_dict(), stock.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied, as in the config
    assert not streamed.training
    ids = _ids(streamed.config.vocab_size)
    assert streamed(ids, labels=ids).loss.item() == stock(ids, labels=ids).loss.item()


def test_a_fresh_head_is_initialized_as_transformers_does(tiny_bert):
    """The folder holds a BertModel: its keys gain the "bert." prefix, and the missing classifier is initialized
    by transformers' own init, drawing the same random numbers."""
    labels = dict(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    torch.manual_seed(7)
    streamed = load_pretrained(tiny_bert, task="sequence-classification", dtype=torch.float32, **labels)
    torch.manual_seed(7)
    stock = _stock(tiny_bert, "sequence-classification", **labels)
    ours, theirs = streamed.state_dict(), stock.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert streamed.classifier.weight.abs().sum() > 0 and streamed.config.id2label == labels["id2label"]


def test_dtype_and_nf4_layers_as_asked(tiny_llama):
    model = load_pretrained(tiny_llama, dtype=torch.bfloat16, device="cpu", quantize="all-linear")
    quantized = {name for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; not the LM head
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {"cpu"}
    for name in quantized:
        layer = model.get_submodule(name)
        assert layer.weight is None and layer.weight_packed.dtype == torch.uint8
        assert layer.base_weight.dtype == torch.bfloat16  # what it dequantizes to


def test_qlora_from_pretrained_equals_the_old_path(tiny_llama):
    """Quantized while loading (from the file's fp32 values) gives the very NF4 codes that quantizing the
    loaded fp32 model gave, and the same loss and adapter gradients."""
    lora = LoRAConfig(r=4, alpha=8, target_modules="all-linear", quantize_base="nf4")
    torch.manual_seed(3)
    new = from_pretrained(tiny_llama, lora=lora, load_in_4bit=True)
    torch.manual_seed(3)
    old = patch(apply_lora(_stock(tiny_llama), lora))
    new_layers = {n: m for n, m in new.named_modules() if isinstance(m, LoRALinear)}
    old_layers = {n: m for n, m in old.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(new_layers) == sorted(old_layers) and len(new_layers) == 14
    for name, layer in new_layers.items():
        assert layer.quantized
        for buffer, value in layer.named_buffers():
            assert torch.equal(value, old_layers[name].get_buffer(buffer)), f"{name}.{buffer}"
        with torch.no_grad():  # a non-zero B, so that the adapters show in the loss
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(len(name)))
            old_layers[name].lora_B.copy_(layer.lora_B)
            old_layers[name].lora_A.copy_(layer.lora_A)
    ids = _ids(new.config.vocab_size)
    with forced_backend("torch"):  # the two loads are compared, not the kernels' backends (tested elsewhere)
        new_loss, old_loss = new(ids, labels=ids).loss, old(ids, labels=ids).loss
        assert new_loss.item() == old_loss.item()
        new_loss.backward()
        old_loss.backward()
    for name, layer in new_layers.items():
        assert torch.equal(layer.lora_A.grad, old_layers[name].lora_A.grad)
    assert [n for n, p in new.named_parameters() if p.requires_grad] == \
        [n for n, p in old.named_parameters() if p.requires_grad]


def test_load_in_4bit_without_lora_gives_a_4bit_model(tiny_llama):
    model = from_pretrained(tiny_llama, load_in_4bit=True, dtype=torch.float32, attention=False, loss=False,
                            norm=False, rope=False, mlp=False)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    stock = _stock(tiny_llama)
    ids = _ids(model.config.vocab_size)
    # NF4 is lossy: close to the fp32 model's loss, not equal
    assert abs(model(ids, labels=ids).loss.item() - stock(ids, labels=ids).loss.item()) < 0.05


def _fake_hub_cache(root, repo_id, source):
    """The hub cache's layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_ids_come_from_the_local_cache_only(tiny_llama, tmp_path, monkeypatch):
    snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_folder("tiny-org/tiny-llama") == snapshot
    model = from_pretrained("tiny-org/tiny-llama", dtype=torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, _stock(tiny_llama).model.embed_tokens.weight)
    with pytest.raises(ConfigError, match=r"'tiny-org/absent'.*local Hugging Face cache.*hf download tiny-org/absent"):
        from_pretrained("tiny-org/absent")
    with pytest.raises(ConfigError, match="'/no/such/folder' does not exist"):  # a path stays a path
        model_folder("/no/such/folder")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lora=5), TypeError, "lora must be a LoRAConfig"),
    (dict(lora={"rank": 4}), TypeError, "rank"),
    (dict(load_in_4bit="yes"), TypeError, "load_in_4bit must be a bool"),
    (dict(dtype=torch.int8), ValueError, "dtype must be"),
    (dict(mlp=1), TypeError, "mlp must be a bool"),
    (dict(task="summarize"), ValueError, "task must be one of"),
    (dict(device="cpu", device_map="cpu"), ValueError, "device and device_map"),
    (dict(device="tpu"), ConfigError, "device: expected one of"),
    (dict(device_map={"model.nothing": "cpu"}), ValueError, "'model.nothing' is not a module"),
    (dict(device_map={"model.layers.0": "cpu"}), ValueError, "device_map places no module holding"),
    (dict(device_map={"": "disk"}), ValueError, "does not offload to disk"),
    (dict(device_map=[]), ValueError, "device_map must be"),
    (dict(lora=LoRAConfig(target_modules=("q_prj",)), load_in_4bit=True), ValueError, "'q_prj' matches no Linear"),
])
def test_bad_arguments_are_named(tiny_llama, kwargs, error, match):
    with pytest.raises(error, match=match):
        from_pretrained(tiny_llama, **kwargs)


def test_a_device_map_places_by_module(tiny_llama):
    model = from_pretrained(tiny_llama, device_map={"model.embed_tokens": "cpu", "": "cpu"}, dtype=torch.float32)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert from_pretrained(tiny_llama, device_map="auto").device.type == ("cuda" if torch.cuda.is_available()
                                                                           else "cpu")


def test_what_streaming_does_not_read_goes_through_transformers(tiny_llama, tmp_path, caplog):
    """A .bin checkpoint: the whole-model path, said in one log line, and the same result."""
    folder = tmp_path / "bin"
    stock = _stock(tiny_llama)
    stock.config.save_pretrained(folder)  # transformers 5 writes safetensors only: the .bin is written by hand
    torch.save(stock.state_dict(), folder / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="ember.loading"):
        model = load_pretrained(folder, dtype=torch.float32, quantize="all-linear")
    assert [r.getMessage() for r in caplog.records if "through transformers' from_pretrained" in r.getMessage()]
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14


def _live_float_bytes() -> int:
    """Bytes of every live dense floating-point tensor storage of this process (each storage once)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("way", ["streaming", "whole"])
def test_no_full_precision_copy_of_the_whole_model_ever_exists(tmp_path, monkeypatch, way):
    """At every quantization (the moment a dense weight and the NF4 model coexist) the live floating-point tensors
    are counted. Streaming: what stays dense plus the one weight being quantized (here a third of the model: one
    layer of three 128 x 4096 projections, to keep the test fast). The whole-model path (the fallback, and ember's old path) holds all of them: the count does see the difference.

    Counted rather than measured as resident memory: on a model this small the allocator's and the quantizer's
    transients make peak RSS differ by a few MiB between runs (the bench, ``python -m ember.bench.load_memory``,
    measures the peak RSS of SmolLM2-135M in fresh processes)."""
    import ember.engine.loading as loading

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=4096, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    dense = transformers.LlamaForCausalLM(config)
    fp32_bytes = sum(p.numel() * 4 for p in dense.parameters())
    quantized_weights = [dense.get_submodule(name).weight.numel() * 4 for name in select_targets(dense, "all-linear")]
    kept_dense_bytes = fp32_bytes - sum(quantized_weights)  # embeddings, LM head, norms: never quantized
    gc.collect()
    before = _live_float_bytes()
    counts = []
    quantize = loading.quantize_nf4

    def counting_quantize(weight, **kwargs):
        counts.append(_live_float_bytes() - before)
        return quantize(weight, **kwargs)

    monkeypatch.setattr(loading, "quantize_nf4", counting_quantize)
    if way == "whole":
        monkeypatch.setattr(loading, "_checkpoint_files", lambda folder: (_ for _ in ()).throw(
            loading.Unsupported("forced, to measure the whole-model path")))
    model = load_pretrained(tmp_path / "model", dtype=torch.float32, quantize="all-linear")
    assert len(counts) == 7 and sum(isinstance(m, NF4Linear) for m in model.modules()) == 7
    largest = max(counts)
    if way == "streaming":  # what stays dense, the one weight being quantized, and the NF4 layers' fp32 tables
        nf4_tables = sum(quantized_weights) // 64  # absmax at most 4 bytes per block of 64: an upper bound
        assert largest <= kept_dense_bytes + max(quantized_weights) + nf4_tables, (largest, fp32_bytes)
        assert largest < 0.4 * fp32_bytes
    else:
        assert largest > 0.9 * fp32_bytes, (largest, fp32_bytes)


def test_the_memory_bench_measures_both_ways(tiny_llama):
    """The bench's measurement, in this process (its figures are meaningful only in fresh ones, as it runs them)."""
    from ember.bench.load_memory import measure_one

    whole, streaming = (measure_one(way, str(tiny_llama), "float32") for way in ("whole", "streaming"))
    assert whole["base_bytes"] == streaming["base_bytes"] > 0  # the same NF4 bases either way
    assert all(row["peak_rss_mib"] >= row["baseline_rss_mib"] > 0 for row in (whole, streaming))


def test_ember_train_quantizes_its_qlora_targets_while_loading(tiny_bert, tmp_path):
    """``ember train --qlora``: the body's Linear layers arrive as NF4Linear (no dense copy to quantize later),
    the fresh classifier stays dense, and prepare_model turns them into NF4 LoRA layers."""
    import ember.engine.train as train_module
    from ember.engine.config import TrainConfig
    from ember.engine.precision import decide

    config = TrainConfig(model=str(tiny_bert), qlora=True, lora_r=4, precision="fp32", max_length=16,
                         out_dir=str(tmp_path))
    model = train_module.load_model(config, tiny_bert, ["neg", "pos"], torch.device("cpu"))
    quantized = sorted(name for name, m in model.named_modules() if isinstance(m, NF4Linear))
    assert len(quantized) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; the pooler
    assert type(model.classifier) is torch.nn.Linear
    model = train_module.prepare_model(model, config, decide("fp32", "cpu"))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(layers) == quantized and all(layer.quantized for layer in layers.values())
    assert model.classifier.weight.requires_grad
