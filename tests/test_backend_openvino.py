"""The OpenVINO backend and ``backend="auto"``.

The pure half (options, CPU flags, precision choice, cache key, the auto decision table) runs everywhere;
the tests that compile graphs need the ``openvino`` package (``pip install 'ram-edge[openvino]'``) and skip
without it. The golden tests also need torch (the exporter) and ``../shared/reference``.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import make_test_bundle, make_test_vocabulary, reference_logits
from ram_edge.runtime import backends
from ram_edge.runtime.backends import MachineInfo, resolve_backend
from ram_edge.runtime.backends.openvino import (
    CpuInfo, OpenVINOBackend, OpenVINOOptions, OpenVINOUnavailableError, cache_key, choose_precision,
    compile_config, import_openvino, read_cpu_info,
)

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="openvino is not installed (pip install 'ram-edge[openvino]')"
)
GOLDENS = ["ram_tiny_224", "ram_plus_tiny_384"]
OV_LOGGER = "ram_edge.runtime.backends.openvino"

#: bf16 logits vs f32 on the tiny goldens. torch's bf16 autocast of the same models moves the golden
#: logits by at most 0.0088 (RAM) / 0.0123 (RAM++). The bound keeps a 4x margin over that; for scale, the
#: team measured 0.062 for OpenVINO bf16 on full-size RAM++ Swin-L, whose logits are ~10x larger. On a
#: CPU without native bf16 OpenVINO compiles f32 and the test checks that it says so.
BF16_LOGIT_BOUND = 0.05


# ------------------------------------------------------------------------------------------------------
# Pure logic


@pytest.mark.parametrize("fields, message", [
    ({"device": ""}, "device must be a device name"),
    ({"inference_precision": "fp16"}, "inference_precision must be 'f32', 'bf16' or None"),
    ({"inference_precision": "bfloat16"}, "inference_precision must be"),
    ({"performance_hint": "FAST"}, "performance_hint must be 'LATENCY' or 'THROUGHPUT'"),
    ({"num_threads": 0}, "num_threads must be a positive integer"),
    ({"num_threads": True}, "num_threads must be a positive integer"),
    ({"num_threads": "2"}, "num_threads must be a positive integer"),
    ({"cache_dir": 3}, "cache_dir must be a folder, True"),
    ({"cache_dir": ""}, "cache_dir must be a folder, True"),
])
def test_bad_options_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        OpenVINOOptions(**fields)
    with pytest.raises(ValueError, match=message):  # the same through the backend's keyword arguments
        OpenVINOBackend("encoder.onnx", **fields)


def test_options_defaults_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    options = OpenVINOOptions(performance_hint="throughput")
    assert options.performance_hint == "THROUGHPUT"
    assert OpenVINOOptions().resolved_cache_dir() == tmp_path / "xdg" / "ram-edge" / "openvino"
    assert OpenVINOOptions(cache_dir=None).resolved_cache_dir() is None
    assert OpenVINOOptions(cache_dir=False).resolved_cache_dir() is None
    assert OpenVINOOptions(cache_dir=tmp_path / "c").resolved_cache_dir() == tmp_path / "c"
    with pytest.raises(TypeError, match=r"unknown OpenVINO option\(s\) \['precision'\]; known: \['device'"):
        OpenVINOBackend("encoder.onnx", precision="bf16")
    with pytest.raises(TypeError, match="either options= or option keyword arguments"):
        OpenVINOBackend("encoder.onnx", OpenVINOOptions(), num_threads=1)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_tile amx_bf16 amx_int8 hypervisor

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""


def test_cpu_info_from_proc_cpuinfo():
    cpu = read_cpu_info(CPUINFO)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx512_bf16", "amx_bf16", "hypervisor"} <= cpu.flags  # the first processor's line
    # the key keeps the ISA flags only: 'hypervisor' or 'fpu' must not split the cache
    assert cpu.key_material() == {"model": "Intel(R) Xeon(R) Platinum 8480+", "flags": [
        "amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512bw", "avx512f", "fma", "sse4_2"]}
    empty = read_cpu_info("")  # not Linux: platform's name, no flags
    assert empty.model and empty.flags == frozenset()


@pytest.mark.parametrize("requested, capabilities, flags, precision, why", [
    (None, ["FP32", "BF16", "INT8"], set(), "bf16", "natively (OpenVINO lists BF16"),
    (None, ["FP32", "INT8"], {"avx512_bf16"}, "bf16", "natively (CPU flags avx512_bf16)"),
    (None, ["FP32", "INT8"], {"amx_bf16", "avx512_bf16"}, "bf16", "CPU flags amx_bf16 avx512_bf16"),
    (None, ["FP32", "INT8", "BIN", "EXPORT_IMPORT"], {"avx2", "fma"}, "f32", "no native bf16"),
    ("f32", ["FP32", "BF16"], {"amx_bf16"}, "f32", "inference_precision='f32' was asked for"),
    ("bf16", ["FP32"], set(), "bf16", "inference_precision='bf16' was asked for"),
])
def test_precision_choice(requested, capabilities, flags, precision, why):
    chosen, reason = choose_precision(requested, capabilities, frozenset(flags))
    assert chosen == precision and why in reason


def test_cache_key_covers_every_input():
    device = {"name": "CPU", "full_name": "AMD EPYC", "capabilities": ["FP32", "INT8"],
              "cpu": CpuInfo("AMD EPYC", frozenset({"avx2"})).key_material()}
    f32 = compile_config(OpenVINOOptions(), "f32")
    assert f32 == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "CPU_DENORMALS_OPTIMIZATION": True}
    base = cache_key("a" * 64, "2026.4.1", device, f32)
    assert base == cache_key("a" * 64, "2026.4.1", dict(device), dict(f32))  # deterministic
    other_cpu = dict(device, cpu=CpuInfo("AMD EPYC", frozenset({"avx2", "avx512f"})).key_material())
    variants = [
        cache_key("b" * 64, "2026.4.1", device, f32),                                     # another graph
        cache_key("a" * 64, "2026.4.0", device, f32),                                     # another OpenVINO
        cache_key("a" * 64, "2026.4.1", other_cpu, f32),                                  # another CPU
        cache_key("a" * 64, "2026.4.1", device, compile_config(OpenVINOOptions(), "bf16")),  # precision
        cache_key("a" * 64, "2026.4.1", device, compile_config(OpenVINOOptions(num_threads=1), "f32")),
        cache_key("a" * 64, "2026.4.1", device, compile_config(OpenVINOOptions(performance_hint="THROUGHPUT"), "f32")),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def _machine(installed=("onnxruntime",), gpu=False, providers=(), arch="x86_64") -> MachineInfo:
    return MachineInfo(frozenset(installed), gpu, tuple(providers), arch)


CUDA_ORT = ("CUDAExecutionProvider", "CPUExecutionProvider")


@pytest.mark.parametrize("machine, name, options, why", [
    (_machine(("onnxruntime", "tensorrt", "openvino"), True, CUDA_ORT), "tensorrt", {},
     "NVIDIA GPU is present and tensorrt + polygraphy are installed"),
    (_machine(("onnxruntime", "tensorrt"), True, CUDA_ORT, "aarch64"), "tensorrt", {}, "tensorrt"),  # Jetson
    (_machine(("onnxruntime", "openvino"), True, CUDA_ORT), "onnxruntime",
     {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}, "CUDAExecutionProvider"),
    (_machine(("onnxruntime", "openvino"), True, ("CPUExecutionProvider",)), "openvino", {},
     "neither tensorrt nor onnxruntime-gpu is installed; openvino is installed"),
    (_machine(("onnxruntime", "tensorrt", "openvino"), False, CUDA_ORT), "openvino", {}, "no NVIDIA GPU; openvino"),
    (_machine(("onnxruntime", "openvino"), False, (), "AMD64"), "openvino", {}, "this CPU is AMD64"),
    (_machine(("onnxruntime", "openvino"), False, (), "aarch64"), "onnxruntime",
     {"providers": ["CPUExecutionProvider"]}, "aarch64, not x86"),
    (_machine(("onnxruntime",), False), "onnxruntime", {"providers": ["CPUExecutionProvider"]},
     "openvino is not installed (pip install 'ram-edge[openvino]')"),
])
def test_auto_decision_table(machine, name, options, why):
    chosen, chosen_options, reason = resolve_backend("auto", machine)
    assert (chosen, chosen_options) == (name, options)
    assert why in reason


def test_resolve_other_names_and_gpu_probe(monkeypatch):
    assert resolve_backend("tensorrt", _machine()) == ("tensorrt", {}, "backend 'tensorrt' was asked for")
    with pytest.raises(ValueError, match="unknown backend 'nope'; choose 'auto' or one of onnxruntime"):
        resolve_backend("nope")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU, whatever /dev holds
    assert backends.cuda_gpu_present() is False
    assert MachineInfo.detect().cuda_gpu is False


def test_registry_and_missing_openvino(monkeypatch, tmp_path):
    assert "openvino" in backends.registered_backends()
    assert ("openvino" in backends.available_backends()) == HAS_OPENVINO
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails, find_spec finds nothing
    assert "openvino" not in backends.available_backends()
    with pytest.raises(ImportError, match=r"needs the module 'openvino'.*pip install 'ram-edge\[openvino\]'"):
        backends.get_backend_class("openvino")
    with pytest.raises(OpenVINOUnavailableError, match=r"pip install 'ram-edge\[openvino\]'"):
        import_openvino()
    assert resolve_backend("auto", MachineInfo.detect())[0] == "onnxruntime"


@pytest.mark.parametrize("version, numpy_version, message", [
    ("2023.3.0", "1.26.4", r"needs openvino >= 2024.0, this is 2023.3.0"),
    ("2024.3.0", "2.1.0", r"openvino 2024.3.0 is built for numpy 1 .* numpy 2.1.0 is installed"),
    ("2024.3.0", "1.26.4", None),
    ("2024.4.0", "2.1.0", None),
    ("2026.4.1-22982-e213a147257-releases/2026/4", "2.4.0", None),
])
def test_openvino_and_numpy_versions(monkeypatch, version, numpy_version, message):
    import types

    monkeypatch.setitem(sys.modules, "openvino", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(np, "__version__", numpy_version)
    if message is None:
        assert import_openvino().__version__ == version
    else:
        with pytest.raises(OpenVINOUnavailableError, match=message):
            import_openvino()


def test_importing_the_backend_imports_no_openvino(tmp_path):
    code = (
        "import sys\n"
        "import ram_edge.runtime\n"
        "import ram_edge.runtime.backends.openvino\n"
        "from ram_edge.runtime.backends import resolve_backend\n"
        "resolve_backend('auto')\n"
        "print(sorted(m for m in ('openvino', 'torch', 'tensorrt') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]"]


# ------------------------------------------------------------------------------------------------------
# Against onnxruntime and the goldens


@pytest.fixture
def ov_options(tmp_path):
    """backend_options with a cache folder of this test's own (never the user's ~/.cache), and f32: the
    exactness tests compare with float32 references, and the default is bf16 on CPUs with native bf16."""
    return {"cache_dir": str(tmp_path / "ov-cache"), "inference_precision": "f32"}


def _golden_pixels(golden_out) -> np.ndarray:
    return np.ascontiguousarray(golden_out["pixel_values"])


@needs_openvino
@pytest.mark.parametrize("golden", GOLDENS)
def test_f32_matches_onnxruntime_and_goldens(golden_bundle, ov_options, golden):
    from ram_edge.runtime import Tagger

    bundle, golden_out = golden_bundle(golden)
    pixels = _golden_pixels(golden_out)
    with Tagger(bundle, providers=["CPUExecutionProvider"]) as reference:
        ort_embeds, ort_logits = reference.encode(pixels), reference.logits(pixels)
    with Tagger(bundle, backend="openvino", backend_options=dict(ov_options, inference_precision="f32")) as tagger:
        assert tagger.backend_name == "openvino" and tagger._encoder.precision == "f32"
        embeds, logits = tagger.encode(pixels), tagger.logits(pixels)
    assert logits.dtype == np.float32 and logits.shape == golden_out["logits"].shape
    np.testing.assert_allclose(embeds, ort_embeds, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, ort_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, golden_out["logits"], atol=1e-4, rtol=0)


@needs_openvino
@pytest.mark.parametrize("golden", GOLDENS)
def test_bf16_stays_within_the_bound(golden_bundle, ov_options, golden, caplog):
    from ram_edge.runtime import Tagger

    bundle, golden_out = golden_bundle(golden)
    pixels = _golden_pixels(golden_out)
    with Tagger(bundle, backend="openvino", backend_options=dict(ov_options, inference_precision="f32")) as f32:
        expected = f32.logits(pixels)
    with caplog.at_level(logging.WARNING, logger=OV_LOGGER):
        with Tagger(bundle, backend="openvino", backend_options=dict(ov_options, inference_precision="bf16")) as bf16:
            compiled = bf16._encoder.precision
            logits = bf16.logits(pixels)
    error = float(np.abs(logits - expected).max())
    if compiled == "bf16":  # a CPU with AVX-512 BF16 / AMX
        assert 0.0 < error <= BF16_LOGIT_BOUND, error
    else:  # OpenVINO compiled f32 (no native bf16) and said so
        assert compiled == "f32" and error <= 1e-6
        assert any("but OpenVINO compiled f32" in r.getMessage() for r in caplog.records)


@needs_openvino
def test_default_precision_follows_this_cpu(test_bundle, tmp_path, caplog):
    """No inference_precision: bf16 where this CPU has it natively (AVX-512 BF16 / AMX), else f32; either
    way the choice and its reason are logged at start-up."""
    cpu = read_cpu_info()
    native = bool({"avx512_bf16", "amx_bf16"} & cpu.flags)
    with caplog.at_level(logging.INFO, logger=OV_LOGGER):
        with OpenVINOBackend(test_bundle / "encoder.onnx", cache_dir=None) as backend:
            compiled, reason = backend.precision, backend.precision_reason
    assert compiled == ("bf16" if native else "f32"), (compiled, reason)
    assert ("natively" if native else "no native bf16") in reason
    assert any(f"precision {compiled}" in r.getMessage() for r in caplog.records if r.name == OV_LOGGER)


# ------------------------------------------------------------------------------------------------------
# Compiled-model cache


def _records(caplog, text):
    return [r for r in caplog.records if r.name == OV_LOGGER and text in r.getMessage()]


@needs_openvino
def test_cache_is_written_reused_and_keyed(test_bundle, tmp_path, caplog):
    from ram_edge.runtime import Tagger

    cache = tmp_path / "cache"
    options = {"cache_dir": str(cache), "inference_precision": "f32"}
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger=OV_LOGGER):
        with Tagger(test_bundle, backend="openvino", backend_options=options) as first:
            assert not first._encoder.loaded_from_cache and not first._decoder.loaded_from_cache
            expected = first.logits(pixels)
            paths = (first._encoder.cache_path, first._decoder.cache_path)
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted([paths[0].name, paths[0].with_suffix(".json").name,
                            paths[1].name, paths[1].with_suffix(".json").name])
    assert paths[0].name.startswith("encoder.") and paths[0].suffix == ".blob"
    assert len(_records(caplog, "cached in")) == 2 and not _records(caplog, "loaded the compiled model")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=OV_LOGGER):
        with Tagger(test_bundle, backend="openvino", backend_options=options) as second:
            assert second._encoder.loaded_from_cache and second._decoder.loaded_from_cache
            assert (second._encoder.cache_path, second._decoder.cache_path) == paths
            # the graph's own names, also for ports OpenVINO gave more names
            assert [t.name for t in second._decoder.input_metadata()] == ["image_embeds", "label_embed", "label_mask"]
            np.testing.assert_array_equal(second.logits(pixels), expected)
    assert len(_records(caplog, "loaded the compiled model")) == 2 and not _records(caplog, "cached in")
    assert sorted(p.name for p in cache.iterdir()) == files  # nothing new written

    # another precision: another key, another file (on this CPU both compile f32)
    with OpenVINOBackend(test_bundle / "encoder.onnx", cache_dir=cache, inference_precision="bf16") as bf16:
        assert not bf16.loaded_from_cache and bf16.cache_path != paths[0]
    # a damaged entry is compiled again, with a warning
    paths[0].write_bytes(b"not a compiled model")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=OV_LOGGER):
        with OpenVINOBackend(test_bundle / "encoder.onnx", cache_dir=cache, inference_precision="f32") as again:
            assert not again.loaded_from_cache and again.cache_path == paths[0]
            np.testing.assert_allclose(again.infer({"pixel_values": pixels})["image_embeds"].shape, (2, 5, 8))
    assert _records(caplog, "unusable")
    with OpenVINOBackend(test_bundle / "encoder.onnx", cache_dir=cache, inference_precision="f32") as rewritten:
        assert rewritten.loaded_from_cache  # the recompiled blob replaced the damaged one


@needs_openvino
def test_a_changed_graph_gets_another_key_and_no_cache_writes_nothing(test_bundle, tmp_path, monkeypatch):
    import onnx

    changed = tmp_path / "changed" / "encoder.onnx"
    changed.parent.mkdir()
    model = onnx.load(str(test_bundle / "encoder.onnx"))
    model.doc_string = "same function, other bytes"
    onnx.save(model, str(changed))
    cache = tmp_path / "cache"
    with OpenVINOBackend(test_bundle / "encoder.onnx", cache_dir=cache) as original, \
            OpenVINOBackend(changed, cache_dir=cache) as other:
        assert original.cache_path != other.cache_path and not other.loaded_from_cache
    assert len(list(cache.glob("encoder.*.blob"))) == 2

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for off in (None, False):
        with OpenVINOBackend(test_bundle / "encoder.onnx", cache_dir=off) as uncached:
            assert uncached.cache_path is None and not uncached.loaded_from_cache
    assert not (tmp_path / "xdg").exists()
    with OpenVINOBackend(test_bundle / "encoder.onnx") as default:  # the default folder
        assert default.cache_path.parent == tmp_path / "xdg" / "ram-edge" / "openvino"
        assert default.cache_path.is_file()


@needs_openvino
def test_port_names_are_the_graphs_own(tmp_path):
    """OpenVINO merges the names of cast tensors into the I/O ports (e.g. '/x_half' and 'x'); the backend
    reports and accepts the ONNX names, on compile and on a cache hit."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["x"], ["/x_half"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["/x_half", "w"], ["/y_half"]),
             helper.make_node("Cast", ["/y_half"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.arange(12, dtype=np.float16).reshape(4, 3), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "cast.onnx"
    onnx.save(model, str(path))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for loaded_from_cache in (False, True):
        with OpenVINOBackend(path, cache_dir=tmp_path / "cache") as backend:
            assert backend.loaded_from_cache is loaded_from_cache
            assert [t.name for t in backend.input_metadata()] == ["x"]
            assert [t.name for t in backend.output_metadata()] == ["y"]
            np.testing.assert_array_equal(backend.infer({"x": x})["y"], x @ np.arange(12).reshape(4, 3))


# ------------------------------------------------------------------------------------------------------
# Constants, threads, shapes, errors


@needs_openvino
def test_metadata_and_vocabulary_handed_over_once(test_bundle, ov_options):
    from ram_edge.runtime import Tagger

    pixels = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with Tagger(test_bundle, backend="openvino", backend_options=ov_options) as tagger:
        decoder = tagger._decoder
        assert [(t.name, t.shape, t.dtype) for t in decoder.input_metadata()] == [
            ("image_embeds", (None, 5, 8), np.float32), ("label_embed", (None, None, 8), np.float32),
            ("label_mask", (None, None), np.bool_)]
        assert [(t.name, t.shape) for t in decoder.output_metadata()] == [("logits", (None, None))]
        original = tagger.vocabulary
        first = [tagger.logits(pixels) for _ in range(3)]
        assert len(decoder._const_tensors) == 1  # one chunk: the vocabulary fits one call
        tensors = dict(decoder._const_tensors[0])
        # the request reads the tensors made at set_vocabulary, no copy per call
        slot = decoder._idle[0]
        assert np.shares_memory(slot.request.get_tensor("label_embed").data, tensors["label_embed"].data)
        for logits in first:
            np.testing.assert_allclose(logits, reference_logits(pixels, original), atol=1e-5)

        subset = original.subset([4, 1])
        tagger.set_vocabulary(subset)
        assert decoder._const_tensors[0]["label_embed"] is not tensors["label_embed"]
        swapped = [tagger.logits(pixels) for _ in range(3)]
        with Tagger(test_bundle, backend="openvino", backend_options=ov_options, vocabulary=subset) as fresh:
            expected = fresh.logits(pixels)
        for logits in swapped:
            assert logits.shape == (3, 2)
            np.testing.assert_array_equal(logits, expected)
        tagger.set_vocabulary(original)  # and back
        np.testing.assert_array_equal(tagger.logits(pixels), first[0])


@needs_openvino
def test_dynamic_batch_and_tag_counts(test_bundle, ov_options):
    from ram_edge.runtime import Tagger

    rng = np.random.default_rng(2)
    with Tagger(test_bundle, backend="openvino", backend_options=ov_options) as tagger:
        for num_tags, descriptions in ((1, [1]), (7, None), (40, [5] * 40)):
            vocab = make_test_vocabulary(num_tags, descriptions=descriptions, seed=num_tags)
            tagger.set_vocabulary(vocab)
            for batch in (1, 4, 9):  # 9 > the manifest's max_batch: OpenVINO keeps the axis unbounded
                pixels = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
                logits = tagger.logits(pixels)
                assert logits.shape == (batch, num_tags)
                np.testing.assert_allclose(logits, reference_logits(pixels, vocab), atol=1e-5)


@needs_openvino
@pytest.mark.parametrize("hint", ["LATENCY", "THROUGHPUT"])
def test_threads_tagging_concurrently_get_identical_results(test_bundle, ov_options, hint):
    from ram_edge.runtime import Tagger

    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1 + i % 3, 3, 64, 64)).astype(np.float32) for i in range(24)]
    with Tagger(test_bundle, backend="openvino", backend_options=dict(ov_options, performance_hint=hint)) as tagger:
        expected = [tagger.logits(x) for x in inputs]
        results = {}
        barrier = threading.Barrier(2)

        def work(index):
            barrier.wait()
            results[index] = [tagger.logits(x) for x in inputs]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pool, created = tagger._encoder._pool_size, tagger._encoder._created
    # LATENCY: one stream, so one request (the callers queue); THROUGHPUT: at most one request per stream
    assert (pool == 1) if hint == "LATENCY" else (pool >= 1)
    assert 1 <= created <= pool
    for index in range(2):
        for got, want in zip(results[index], expected):
            np.testing.assert_array_equal(got, want)


@needs_openvino
def test_bad_inputs_and_devices_are_refused(test_bundle, ov_options):
    from ram_edge.runtime import Tagger

    with OpenVINOBackend(test_bundle / "decoder.onnx", cache_dir=None) as decoder:
        with pytest.raises(ValueError, match=r"input image_embeds float32 \(\?, 5, 8\) cannot take an array of "
                                             r"shape \(1, 4, 8\)"):
            decoder.set_constant_inputs({"image_embeds": np.zeros((1, 4, 8), np.float32)})
        with pytest.raises(KeyError, match="has no input 'labels'"):
            decoder.set_constant_inputs({"labels": np.zeros((1, 8), np.float32)})
        with pytest.raises(KeyError, match="inputs not given"):
            decoder.infer({"image_embeds": np.zeros((1, 5, 8), np.float32)})
        decoder.set_constant_inputs({"label_embed": np.ones((2, 1, 8), np.float32),
                                     "label_mask": np.array([[1], [1]], np.int64)})  # a 0/1 mask is a mask
        out = decoder.infer({"image_embeds": np.ones((1, 5, 8), np.float64)})  # converted to float32
        np.testing.assert_allclose(out["logits"], [[32.0, 32.0]])
        with pytest.raises(TypeError, match="expected a bool mask"):
            decoder.set_constant_inputs({"label_mask": np.array([["a"]])})
    with pytest.raises(ValueError, match="OpenVINO device 'NPU9' is not available here"):
        OpenVINOBackend(test_bundle / "encoder.onnx", device="NPU9", cache_dir=None).activate()
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        OpenVINOBackend(test_bundle / "missing.onnx", cache_dir=None).activate()
    with pytest.raises(ValueError, match="performance_hint must be"):
        Tagger(test_bundle, backend="openvino", backend_options={"performance_hint": "fast"})
    with pytest.raises(ValueError, match="providers and intra_op_threads are onnxruntime settings"):
        Tagger(test_bundle, backend="openvino", intra_op_threads=2)
    Path(ov_options["cache_dir"]).write_text("a file, not a folder")
    with pytest.raises(ValueError, match="cache_dir .* is not a writable folder"):
        OpenVINOBackend(test_bundle / "encoder.onnx", **ov_options).activate()


@needs_openvino
def test_int8_qdq_graph_runs_like_onnxruntime(tmp_path):
    """INT8 bundles will be QuantizeLinear / DequantizeLinear graphs with float I/O: nothing here assumes
    float-only graphs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    weights = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
             numpy_helper.from_array(weights, "w_q"),
             numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "qdq.onnx"
    onnx.save(model, str(path))
    x = rng.uniform(-2, 2, (5, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with OpenVINOBackend(path, cache_dir=tmp_path / "cache") as backend:
        got = backend.infer({"x": x})["y"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# backend="auto" on this machine


def _auto_picks_openvino_here() -> bool:
    machine = MachineInfo.detect()
    return resolve_backend("auto", machine)[0] == "openvino"


@needs_openvino
def test_tagger_auto_picks_openvino_and_says_why(test_bundle, tmp_path, monkeypatch, caplog):
    from ram_edge.runtime import Tagger

    if not _auto_picks_openvino_here():
        pytest.skip(f"auto picks {resolve_backend('auto')[0]} on this machine (a GPU, or not x86)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with caplog.at_level(logging.INFO, logger="ram_edge.runtime.tagger"):
        with Tagger(test_bundle, backend="auto") as tagger:
            assert tagger.backend_name == "openvino" and isinstance(tagger._encoder, OpenVINOBackend)
            assert "openvino is installed" in tagger.backend_reason
            pixels = np.zeros((1, 3, 64, 64), np.float32)
            np.testing.assert_allclose(tagger.logits(pixels), reference_logits(pixels, tagger.vocabulary), atol=1e-5)
    messages = [r.getMessage() for r in caplog.records if r.name == "ram_edge.runtime.tagger"]
    assert any(m.startswith("backend='auto' chose openvino: ") for m in messages), messages


@needs_openvino
def test_ram_tag_backend_auto(test_bundle, image_dir, tmp_path, monkeypatch, capsys):
    from ram_edge.runtime.cli import main

    if not _auto_picks_openvino_here():
        pytest.skip("auto does not pick openvino on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "tags.jsonl"
    code = main([str(test_bundle), str(image_dir), "--backend", "auto", "--format", "jsonl", "--out", str(out),
                 "--top-k", "2", "--threshold", "0"])
    assert code == 0
    assert "ram-tag: --backend auto: openvino (" in capsys.readouterr().err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
