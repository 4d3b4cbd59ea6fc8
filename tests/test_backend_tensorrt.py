"""The TensorRT backend (runtime/backends/tensorrt.py).

CPU tests cover the pure half (options, profiles, cache keys, shape checks, dtypes) and the errors when
TensorRT or a GPU is missing. The ``gpu`` tests build real engines from a tiny exported bundle and compare
with onnxruntime; they skip cleanly without tensorrt, polygraphy, torch or a CUDA device.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import types

import numpy as np
import pytest

from ram_edge.runtime import backends
from ram_edge.runtime.backends.base import TensorInfo
from ram_edge.runtime.backends import tensorrt as trt_backend
from ram_edge.runtime.backends.tensorrt import (
    BuildPlan, ShapeRange, TensorRTBackend, TensorRTOptions, TensorRTUnavailableError, cache_key, check_shape,
    cuda_device, dimension_ranges, engine_file_name, import_tensorrt, numpy_dtype, plan_build, prepare_input,
)

from conftest import make_test_bundle  # noqa: E402  (tests/ is on sys.path)


def ram_plus_manifest(precision="fp32", max_batch=32, num_tags=4585, max_descriptions=51):
    """The graphs / vocabulary sections of a RAM++ Swin-L 384 manifest (docs/bundle.md)."""
    tokens = ["batch", 145, 512]
    return {
        "precision": precision,
        "max_batch": max_batch,
        "graphs": {
            "encoder": {"file": "encoder.onnx",
                        "inputs": [{"name": "pixel_values", "shape": ["batch", 3, 384, 384], "dtype": "float32"}],
                        "outputs": [{"name": "image_embeds", "shape": tokens, "dtype": "float32"}]},
            "decoder": {"file": "decoder.onnx",
                        "inputs": [{"name": "image_embeds", "shape": tokens, "dtype": "float32"},
                                   {"name": "label_embed", "shape": ["tags", "descriptions", 512], "dtype": "float32"},
                                   {"name": "label_mask", "shape": ["tags", "descriptions"], "dtype": "bool"}],
                        "outputs": [{"name": "logits", "shape": ["batch", "tags"], "dtype": "float32"}]},
        },
        "vocabulary": {"dir": "vocabulary", "num_tags": num_tags, "max_descriptions": max_descriptions},
    }


# ------------------------------------------------------------------------------------------------------
# Options


def test_options_from_environment_and_overrides():
    env = {"RAM_EDGE_TRT_MAX_TAGS": "30000", "RAM_EDGE_TRT_FP16": "1", "RAM_EDGE_TRT_CACHE_DIR": "/tmp/engines",
           "RAM_EDGE_TRT_MAX_BATCH": " ", "RAM_EDGE_TRT_TF32": "off"}
    options = TensorRTOptions.from_env(env)
    assert (options.max_tags, options.fp16, options.cache_dir, options.max_batch, options.tf32) == (
        30000, True, "/tmp/engines", None, False)
    options = TensorRTOptions.from_env(env, max_tags=100, fp16=None, max_batch=4)  # None keeps the environment
    assert (options.max_tags, options.fp16, options.max_batch) == (100, True, 4)
    assert TensorRTOptions.from_env({}) == TensorRTOptions()


@pytest.mark.parametrize("env, message", [
    ({"RAM_EDGE_TRT_MAX_TAGS": "lots"}, "RAM_EDGE_TRT_MAX_TAGS='lots': expected an integer"),
    ({"RAM_EDGE_TRT_FP16": "maybe"}, "RAM_EDGE_TRT_FP16='maybe': expected 1 or 0"),
    ({"RAM_EDGE_TRT_MAX_BATCH": "0"}, "max_batch must be a positive integer"),
    ({"RAM_EDGE_TRT_ALLOCATION": "lazy"}, "allocation must be"),
    ({"RAM_EDGE_TRT_BUILDER_OPTIMIZATION_LEVEL": "9"}, "builder_optimization_level must be 0..5"),
])
def test_bad_options_are_refused(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TensorRTOptions.from_env(env)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown TensorRT option"):
        TensorRTOptions.from_env({}, max_tag=5)
    with pytest.raises(TypeError, match="either options= or"):
        TensorRTBackend("decoder.onnx", TensorRTOptions(), max_tags=5)


# ------------------------------------------------------------------------------------------------------
# Profiles and flags


def test_ram_plus_profiles_from_the_manifest():
    manifest = ram_plus_manifest()
    encoder = plan_build(manifest, "encoder.onnx", TensorRTOptions())
    assert encoder.role == "encoder" and encoder.flags == ()
    assert encoder.profile == {"pixel_values": ShapeRange((1, 3, 384, 384), (16, 3, 384, 384), (32, 3, 384, 384))}

    decoder = plan_build(manifest, "decoder.onnx", TensorRTOptions())
    assert decoder.role == "decoder"
    assert decoder.profile == {
        "image_embeds": ShapeRange((1, 145, 512), (16, 145, 512), (32, 145, 512)),
        "label_embed": ShapeRange((1, 1, 512), (4585, 51, 512), (20000, 51, 512)),
        "label_mask": ShapeRange((1, 1), (4585, 51), (20000, 51)),
    }
    assert decoder.dim_names["label_embed"] == ("tags", "descriptions", 512)


def test_profile_options():
    manifest = ram_plus_manifest(max_batch=8)
    assert dimension_ranges(manifest, TensorRTOptions()) == {
        "batch": (1, 8, 8), "tags": (1, 4585, 20000), "descriptions": (1, 51, 51)}
    ranges = dimension_ranges(manifest, TensorRTOptions(max_batch=64, opt_batch=4, max_tags=30000, max_descriptions=64))
    assert ranges == {"batch": (1, 4, 64), "tags": (1, 4585, 30000), "descriptions": (1, 51, 64)}
    # A smaller max_tags (a small custom vocabulary, less memory): opt follows it down.
    assert dimension_ranges(manifest, TensorRTOptions(max_tags=100))["tags"] == (1, 100, 100)
    # The bundle's own D is always accepted.
    assert dimension_ranges(manifest, TensorRTOptions(max_descriptions=3))["descriptions"] == (1, 51, 51)
    # A vocabulary larger than 20000 raises the default maximum to its size.
    assert dimension_ranges(ram_plus_manifest(num_tags=25000), TensorRTOptions())["tags"] == (1, 25000, 25000)
    # RAM (one description per tag).
    assert dimension_ranges(ram_plus_manifest(max_descriptions=1), TensorRTOptions())["descriptions"] == (1, 1, 1)


@pytest.mark.parametrize("precision, fp16, tf32, flags", [
    ("fp32", None, False, ()),
    ("fp16", None, False, ("fp16",)),
    ("fp32", True, False, ("fp16",)),   # fp16 kernels allowed for an fp32 bundle
    ("fp16", False, False, ()),
    ("fp32", None, True, ("tf32",)),
    ("int8", None, False, ("fp16", "int8")),
])
def test_builder_flags(precision, fp16, tf32, flags):
    plan = plan_build(ram_plus_manifest(precision), "decoder.onnx", TensorRTOptions(fp16=fp16, tf32=tf32))
    assert plan.flags == flags and plan.precision == precision


def test_plan_refusals():
    with pytest.raises(ValueError, match="other.onnx: not a graph of this bundle"):
        plan_build(ram_plus_manifest(), "other.onnx", TensorRTOptions())
    manifest = ram_plus_manifest()
    manifest["graphs"]["encoder"]["inputs"][0]["shape"] = ["frames", 3, 384, 384]
    with pytest.raises(ValueError, match="dimension 'frames'"):
        plan_build(manifest, "encoder.onnx", TensorRTOptions())
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        ShapeRange((1,), (8,), (4,))
    with pytest.raises(ValueError, match="int8-dynamic bundle is for onnxruntime"):
        plan_build(ram_plus_manifest("int8-dynamic"), "decoder.onnx", TensorRTOptions())


def test_profiles_of_the_test_bundle(tmp_path):
    from ram_edge.bundle_format import read_manifest

    manifest = read_manifest(make_test_bundle(tmp_path))
    plan = plan_build(manifest, "decoder.onnx", TensorRTOptions(max_tags=10))
    num_tags, d = manifest["vocabulary"]["num_tags"], manifest["vocabulary"]["max_descriptions"]
    e = manifest["model"]["embed_dim"]
    assert plan.profile["label_embed"] == ShapeRange((1, 1, e), (min(num_tags, 10), d, e), (10, d, e))
    assert plan.profile["label_mask"].max == (10, d)


# ------------------------------------------------------------------------------------------------------
# Cache key


def test_cache_key_covers_every_input():
    manifest = ram_plus_manifest()
    plan = plan_build(manifest, "decoder.onnx", TensorRTOptions())
    base = cache_key("a" * 64, "10.3.0", "NVIDIA Orin (sm_87)", plan)
    assert len(base) == 64 and int(base, 16) >= 0
    assert base == cache_key("a" * 64, "10.3.0", "NVIDIA Orin (sm_87)", plan_build(manifest, "decoder.onnx",
                                                                                     TensorRTOptions()))
    variants = [
        cache_key("b" * 64, "10.3.0", "NVIDIA Orin (sm_87)", plan),
        cache_key("a" * 64, "10.4.0", "NVIDIA Orin (sm_87)", plan),
        cache_key("a" * 64, "10.3.0", "NVIDIA H100 (sm_90)", plan),
        cache_key("a" * 64, "10.3.0", "NVIDIA Orin (sm_87)", plan_build(manifest, "decoder.onnx",
                                                                          TensorRTOptions(max_tags=30000))),
        cache_key("a" * 64, "10.3.0", "NVIDIA Orin (sm_87)", plan_build(manifest, "decoder.onnx",
                                                                          TensorRTOptions(fp16=True))),
        cache_key("a" * 64, "10.3.0", "NVIDIA Orin (sm_87)", plan_build(manifest, "decoder.onnx",
                                                                          TensorRTOptions(workspace_mb=512))),
        cache_key("a" * 64, "10.3.0", "NVIDIA Orin (sm_87)", plan_build(manifest, "decoder.onnx",
                                                                          TensorRTOptions(opt_batch=1))),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # Options that do not change the engine (cache location, runtime allocation) do not change the key.
    same = plan_build(manifest, "decoder.onnx", TensorRTOptions(cache_dir="/x", allocation="static"))
    assert cache_key("a" * 64, "10.3.0", "NVIDIA Orin (sm_87)", same) == base
    assert engine_file_name("decoder.onnx", base) == f"decoder.{base[:24]}.engine"


# ------------------------------------------------------------------------------------------------------
# Shapes and dtypes


def _decoder_plan(**options) -> BuildPlan:
    return plan_build(ram_plus_manifest(), "decoder.onnx", TensorRTOptions(**options))


def test_check_shape_inside_the_profile_passes():
    plan = _decoder_plan()
    for name, shape in [("label_embed", (1, 1, 512)), ("label_embed", (20000, 51, 512)), ("label_mask", (7, 3)),
                        ("image_embeds", (32, 145, 512))]:
        check_shape(name, shape, plan.profile[name], plan.dim_names[name], "decoder.onnx")


def test_too_many_tags_says_how_to_rebuild():
    plan = _decoder_plan()
    with pytest.raises(ValueError) as info:
        check_shape("label_embed", (25000, 51, 512), plan.profile["label_embed"], plan.dim_names["label_embed"],
                    "decoder.onnx")
    message = str(info.value)
    assert "the vocabulary has 25000 tags" in message and "at most 20000" in message
    assert "max_tags=25000" in message and "RAM_EDGE_TRT_MAX_TAGS=25000" in message


def test_other_shape_errors():
    plan = _decoder_plan()
    embeds, dims = plan.profile["image_embeds"], plan.dim_names["image_embeds"]
    with pytest.raises(ValueError, match=r"a batch of 33 images.*at most 32.*RAM_EDGE_TRT_MAX_BATCH=33.*--batch-size"):
        check_shape("image_embeds", (33, 145, 512), embeds, dims, "decoder.onnx")
    with pytest.raises(ValueError, match=r"needs dimension 1 = 145"):
        check_shape("image_embeds", (2, 50, 512), embeds, dims, "decoder.onnx")
    with pytest.raises(ValueError, match=r"must have 3 dimensions"):
        check_shape("image_embeds", (145, 512), embeds, dims, "decoder.onnx")
    with pytest.raises(ValueError, match=r"has batch = 0; it must be at least 1"):
        check_shape("image_embeds", (0, 145, 512), embeds, dims, "decoder.onnx")
    with pytest.raises(ValueError, match=r"up to 60 descriptions.*RAM_EDGE_TRT_MAX_DESCRIPTIONS=60"):
        check_shape("label_mask", (10, 60), plan.profile["label_mask"], plan.dim_names["label_mask"], "decoder.onnx")


def test_numpy_dtype_mapping():
    class FakeDataType:  # tensorrt.DataType members expose .name
        def __init__(self, name):
            self.name = name

    assert numpy_dtype(FakeDataType("BOOL")) == np.bool_
    assert numpy_dtype(FakeDataType("FLOAT")) == np.float32
    assert numpy_dtype("DataType.HALF") == np.float16
    assert numpy_dtype("INT64") == np.int64
    assert np.dtype(np.bool_).itemsize == 1  # TensorRT BOOL is one byte
    with pytest.raises(TypeError, match="FP8"):
        numpy_dtype("FP8")


def test_prepare_input_masks_and_floats():
    mask = np.array([[True, False], [True, True]])
    assert prepare_input("label_mask", mask, np.bool_) is mask  # already right: no copy
    raw = np.array([[2, 0], [1, 255]], dtype=np.uint8)  # bytes other than 0/1 are undefined for TensorRT BOOL
    out = prepare_input("label_mask", raw, np.bool_)
    assert out.dtype == np.bool_ and out.tolist() == [[True, False], [True, True]]
    assert out.view(np.uint8).max() == 1
    half = np.ones((2, 3, 4), np.float16)[:, ::2]  # non-contiguous float16
    out = prepare_input("label_embed", half, np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (2, 2, 4)
    with pytest.raises(TypeError, match="expected float32 numbers, got bool"):
        prepare_input("image_embeds", mask, np.float32)
    with pytest.raises(TypeError, match="expected a bool mask"):
        prepare_input("label_mask", np.array([["a"]]), np.bool_)


def test_too_large_vocabulary_keeps_the_previous_one(tmp_path):
    """set_constant_inputs checks against the engine's profile before anything is uploaded. The engine is
    replaced by its profile (what _activate reads from it) so this runs without a GPU."""
    from ram_edge.bundle_format import read_manifest

    bundle = make_test_bundle(tmp_path)
    manifest = read_manifest(bundle)
    backend = TensorRTBackend(bundle / "decoder.onnx", TensorRTOptions(max_tags=4))
    backend.plan = plan_build(manifest, "decoder.onnx", backend.options)
    backend._ranges = dict(backend.plan.profile)
    backend._inputs = tuple(
        TensorInfo(t["name"], tuple(t["shape"]), np.dtype({"float32": np.float32, "bool": np.bool_}[t["dtype"]]))
        for t in manifest["graphs"]["decoder"]["inputs"]
    )
    uploads = []
    backend._on_constants_changed = lambda: uploads.append(dict(backend._constants))
    backend._active = True
    e = manifest["model"]["embed_dim"]
    d = manifest["vocabulary"]["max_descriptions"]
    backend.set_constant_inputs({"label_embed": np.zeros((4, d, e), np.float16), "label_mask": np.ones((4, d), np.uint8)})
    assert len(uploads) == 1 and uploads[0]["label_embed"].dtype == np.float32
    assert uploads[0]["label_mask"].dtype == np.bool_
    with pytest.raises(ValueError, match="5 tags.*at most 4.*max_tags=5"):
        backend.set_constant_inputs({"label_embed": np.zeros((5, d, e), np.float32),
                                     "label_mask": np.ones((5, d), bool)})
    assert len(uploads) == 1 and backend._constants["label_embed"].shape[0] == 4
    with pytest.raises(KeyError, match="no input 'labels'"):
        backend.set_constant_inputs({"labels": np.zeros((1,))})


# ------------------------------------------------------------------------------------------------------
# Missing TensorRT / GPU


INSTALL = "pip install 'ram-edge[trt]' on a machine with an NVIDIA GPU; on Jetson use the JetPack TensorRT"


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, find_spec finds nothing


def test_missing_tensorrt_is_a_clear_import_error(no_tensorrt, tmp_path):
    with pytest.raises(TensorRTUnavailableError, match="'tensorrt'") as info:
        import_tensorrt()
    assert INSTALL in str(info.value) and isinstance(info.value, ImportError)
    bundle = make_test_bundle(tmp_path)
    with pytest.raises(TensorRTUnavailableError, match=r"ram-edge\[trt\]"):
        TensorRTBackend(bundle / "encoder.onnx").activate()


def test_tagger_and_registry_without_tensorrt(no_tensorrt, tmp_path):
    from ram_edge.runtime import Tagger

    assert "tensorrt" not in backends.available_backends()
    assert "onnxruntime" in backends.available_backends()
    assert "tensorrt" in backends.registered_backends()
    with pytest.raises(ImportError) as info:
        backends.get_backend_class("tensorrt")
    assert "'tensorrt'" in str(info.value) and INSTALL in str(info.value)
    with pytest.raises(ImportError, match=r"ram-edge\[trt\]"):
        Tagger(make_test_bundle(tmp_path), backend="tensorrt")


def test_registry_reports_only_importable_backends(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "fake-missing", ("x.y", "Z", "install it", ("no_such_module_zz9",)))
    monkeypatch.setitem(backends._REGISTRY, "fake-present", ("x.y", "Z", "", ("numpy",)))
    available = backends.available_backends()
    assert "fake-present" in available and "fake-missing" not in available
    with pytest.raises(ImportError, match="needs the module 'no_such_module_zz9', which is not installed: install it"):
        backends.get_backend_class("fake-missing")
    backends.register_backend("fake-registered", "x.y", "Z", requires=["no_such_module_zz9"])
    try:
        assert "fake-registered" in backends.registered_backends()
        assert "fake-registered" not in backends.available_backends()
    finally:
        del backends._REGISTRY["fake-registered"]


def test_importing_the_backend_imports_no_gpu_package(tmp_path):
    code = (
        "import sys\n"
        "for m in ('tensorrt', 'polygraphy', 'pycuda', 'torch'): sys.modules[m] = None\n"
        "import ram_edge.runtime\n"
        "import ram_edge.runtime.backends.tensorrt as t\n"
        "print(sorted(m for m in ('tensorrt', 'polygraphy', 'pycuda', 'torch') if sys.modules.get(m)))\n"
        "print('tensorrt' in ram_edge.runtime.backends.available_backends())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout.split()
    assert out == ["[]", "False"]


class _FakeCudart:
    def __init__(self, count, status=0, name=b"NVIDIA Jetson Orin", cc=(8, 7)):
        self.count, self.status, self.name, self.cc = count, status, name, cc

    def cudaGetDeviceCount(self, ref):
        ref._obj.value = self.count
        return self.status

    def cudaDeviceGetAttribute(self, ref, attr, device):
        ref._obj.value = self.cc[0] if attr == 75 else self.cc[1]
        return 0

    def cudaGetDeviceProperties(self, buffer, device):
        buffer[: len(self.name)] = self.name
        return 0


def _fake_polygraphy_cuda(monkeypatch, wrapper):
    cuda = types.ModuleType("polygraphy.cuda")
    cuda.wrapper = wrapper
    package = types.ModuleType("polygraphy")
    package.cuda = cuda
    monkeypatch.setitem(sys.modules, "polygraphy", package)
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", cuda)


def test_no_cuda_device(monkeypatch):
    _fake_polygraphy_cuda(monkeypatch, lambda: types.SimpleNamespace(handle=_FakeCudart(0, status=100)))
    with pytest.raises(TensorRTUnavailableError, match=r"no CUDA device 0 is usable \(cudaGetDeviceCount returned "
                                                         r"error 100.*backend='onnxruntime'"):
        cuda_device()
    _fake_polygraphy_cuda(monkeypatch, lambda: types.SimpleNamespace(handle=_FakeCudart(1)))
    with pytest.raises(TensorRTUnavailableError, match=r"no CUDA device 1 is usable \(1 CUDA device"):
        cuda_device(1)


def test_no_cuda_runtime_library(monkeypatch):
    def missing():
        raise OSError("libcudart.so: cannot open shared object file")

    _fake_polygraphy_cuda(monkeypatch, missing)
    with pytest.raises(TensorRTUnavailableError, match="libcudart.*nvidia-cuda-runtime-cu12"):
        cuda_device()


def test_gpu_name_enters_the_key(monkeypatch):
    _fake_polygraphy_cuda(monkeypatch, lambda: types.SimpleNamespace(handle=_FakeCudart(1)))
    assert cuda_device() == "NVIDIA Jetson Orin (sm_87)"
    assert ctypes.sizeof(ctypes.create_string_buffer(16384)) > 1100  # cudaDeviceProp is about 1 KB


# ------------------------------------------------------------------------------------------------------
# On a GPU: real engines against onnxruntime


def _require_gpu():
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    try:
        import_tensorrt()
        cuda_device()
    except TensorRTUnavailableError as e:
        pytest.skip(str(e))
    pytest.importorskip("torch", reason="exporting the test bundle needs torch (ram-edge[export])")


@pytest.fixture(scope="module")
def exported_bundles(tmp_path_factory):
    """fp32 and fp16 bundles of the tiny RAM++ demo model with 50 tags."""
    _require_gpu()
    from ram_edge.export import export_bundle
    from ram_edge.models import demo_model

    root = tmp_path_factory.mktemp("trt-bundles")
    model = demo_model("ram_plus_tiny_384", num_tags=50)
    bundles = {}
    for precision in ("fp32", "fp16"):
        export_bundle(model, root / precision, precision=precision, max_batch=8)
        bundles[precision] = root / precision
    return bundles


def _pixels(batch, size=384, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_logits_match_onnxruntime(exported_bundles, tmp_path, monkeypatch, precision, tolerance):
    from ram_edge.runtime import Tagger

    monkeypatch.setenv("RAM_EDGE_TRT_CACHE_DIR", str(tmp_path / "engines"))
    bundle = exported_bundles[precision]
    pixels = _pixels(3)
    with Tagger(bundle, providers=["CPUExecutionProvider"]) as reference:
        expected_embeds = reference.encode(pixels)
        expected = reference.logits(pixels)
        subset = reference.vocabulary.subset(list(range(0, 50, 5)))
        reference.set_vocabulary(subset)
        expected_subset = reference.logits(pixels)
    with Tagger(bundle, backend="tensorrt") as tagger:
        assert tagger._decoder.plan.flags == (("fp16",) if precision == "fp16" else ())
        embeds = tagger.encode(pixels)
        logits = tagger.logits(pixels)
        assert logits.dtype == np.float32 and logits.shape == (3, 50)
        np.testing.assert_allclose(embeds, expected_embeds, atol=tolerance, rtol=0)
        np.testing.assert_allclose(logits, expected, atol=tolerance, rtol=0)
        single = tagger.logits(pixels[:1])  # another batch size: new input shape, same engine
        np.testing.assert_allclose(single, expected[:1], atol=tolerance, rtol=0)
        np.testing.assert_allclose(logits, tagger.logits(pixels), atol=0, rtol=0)  # outputs are copies
        tagger.set_vocabulary(subset)
        np.testing.assert_allclose(tagger.logits(pixels), expected_subset, atol=tolerance, rtol=0)
        result = tagger.tag(np.zeros((40, 50, 3), np.uint8), threshold=0, top_k=3)
        assert len(result.tags) == 3
    engines = sorted(p.name for p in (tmp_path / "engines").glob("*.engine"))
    assert len(engines) == 2 and engines[0].startswith("decoder.") and engines[1].startswith("encoder.")


@pytest.mark.gpu
def test_engine_cache_is_reused_and_keyed(exported_bundles, tmp_path):
    bundle = exported_bundles["fp32"]
    options = TensorRTOptions(cache_dir=str(tmp_path), max_tags=60)
    pixels = _pixels(2, seed=1)
    with TensorRTBackend(bundle / "encoder.onnx", options) as first:
        assert not first.loaded_from_cache and first.engine_path.is_file()
        assert first.engine_path.with_suffix(".json").is_file()
        out = first.infer({"pixel_values": pixels})["image_embeds"]
    with TensorRTBackend(bundle / "encoder.onnx", options) as second:
        assert second.loaded_from_cache and second.engine_path == first.engine_path
        np.testing.assert_array_equal(second.infer({"pixel_values": pixels})["image_embeds"], out)
    with TensorRTBackend(bundle / "encoder.onnx", TensorRTOptions(cache_dir=str(tmp_path), max_batch=4)) as third:
        assert not third.loaded_from_cache and third.engine_path != first.engine_path
        assert third.profile["pixel_values"].max[0] == 4
        with pytest.raises(ValueError, match="a batch of 5 images"):
            third.infer({"pixel_values": _pixels(5)})
    first.engine_path.write_bytes(b"not an engine")  # a damaged cache entry is rebuilt
    with TensorRTBackend(bundle / "encoder.onnx", options) as fourth:
        assert not fourth.loaded_from_cache
        np.testing.assert_allclose(fourth.infer({"pixel_values": pixels})["image_embeds"], out, atol=1e-5)


@pytest.mark.gpu
def test_vocabulary_beyond_the_profile_is_refused(exported_bundles, tmp_path, monkeypatch):
    from ram_edge.runtime import Tagger
    from ram_edge.vocabulary import Vocabulary

    monkeypatch.setenv("RAM_EDGE_TRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RAM_EDGE_TRT_MAX_TAGS", "60")
    with Tagger(exported_bundles["fp32"], backend="tensorrt") as tagger:
        assert tagger._decoder.profile["label_embed"].max[0] == 60
        big = Vocabulary([f"t{i}" for i in range(61)], np.ones((61, tagger.vocabulary.embed_dim), np.float32))
        with pytest.raises(ValueError, match="61 tags.*at most 60.*RAM_EDGE_TRT_MAX_TAGS=61"):
            tagger.set_vocabulary(big)
        assert len(tagger.vocabulary) == 50
        assert tagger.logits(_pixels(1)).shape == (1, 50)  # the previous vocabulary still works


# ------------------------------------------------------------------------------------------------------
# The GPU half's wiring, on CPU: tensorrt / polygraphy replaced by fakes that run the ONNX graph with
# onnxruntime. This checks our use of the engine cache, profiles, device constants and outputs, not
# TensorRT itself (the gpu tests above do that).


class _FakeTrt(types.ModuleType):
    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.3.0"
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.IExecutionContext = type("IExecutionContext", (), {"update_device_memory_size_for_shapes": None})


class _FakeEngine:
    _ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(bool)": "BOOL"}

    def __init__(self, blob: bytes):
        import json

        import onnxruntime as ort

        spec = json.loads(blob.decode("utf-8"))
        self.path, self.profile = spec["path"], spec["profile"]
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.io = [(a, "INPUT") for a in self.session.get_inputs()] + [(a, "OUTPUT") for a in self.session.get_outputs()]

    num_io_tensors = property(lambda self: len(self.io))

    def _arg(self, name):
        return next(pair for pair in self.io if pair[0].name == name)

    def get_tensor_name(self, i):
        return self.io[i][0].name

    def get_tensor_mode(self, name):
        return self._arg(name)[1]

    def get_tensor_shape(self, name):
        return [d if isinstance(d, int) else -1 for d in self._arg(name)[0].shape]

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self._ORT_TO_TRT[self._arg(name)[0].type])

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return [tuple(s) for s in self.profile[name]]


class _FakeDeviceArray:
    uploads = 0

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.host = shape, dtype, None

    def copy_from(self, array):
        type(self).uploads += 1
        self.host = array.copy()

    def free(self):
        self.host = None


class _FakeRunner:
    def __init__(self, engine, allocation_strategy=None):
        self.engine, self.allocation_strategy, self.buffers, self.feeds = engine, allocation_strategy, {}, []

    def activate(self):
        pass

    def deactivate(self):
        pass

    def infer(self, feed_dict, check_inputs=True):
        self.feeds.append(dict(feed_dict))
        feeds = {n: (v.host if isinstance(v, _FakeDeviceArray) else v) for n, v in feed_dict.items()}
        names = [a.name for a in self.engine.session.get_outputs()]
        for name, value in zip(names, self.engine.session.run(names, feeds)):
            buffer = self.buffers.setdefault(name, np.empty(0, value.dtype))
            buffer.resize(value.shape, refcheck=False)  # reused between calls, as Polygraphy's host buffers
            buffer[...] = value
        return dict(self.buffers)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import json

    builds = []

    def engine_bytes_from_network(network, config):
        builds.append(config)
        profile = {n: [list(s) for s in shapes] for n, shapes in config["profiles"][0].items()}
        return json.dumps({"path": network, "profile": profile}).encode("utf-8")

    def engine_from_bytes(blob):
        try:
            return _FakeEngine(bytes(blob))
        except ValueError as e:
            raise RuntimeError(f"Could not deserialize engine: {e}") from e

    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = (min, opt, max)
            return self

    poly_trt = types.ModuleType("polygraphy.backend.trt")
    poly_trt.Profile = Profile
    poly_trt.CreateConfig = lambda **kwargs: kwargs
    poly_trt.network_from_onnx_path = lambda path: path
    poly_trt.engine_bytes_from_network = engine_bytes_from_network
    poly_trt.engine_from_bytes = engine_from_bytes
    poly_trt.TrtRunner = _FakeRunner
    cuda = types.ModuleType("polygraphy.cuda")
    cuda.wrapper = lambda: types.SimpleNamespace(handle=_FakeCudart(1, name=b"Fake GPU"))
    cuda.DeviceArray = _FakeDeviceArray
    datatype = types.ModuleType("polygraphy.datatype")
    datatype.DataType = types.SimpleNamespace(from_dtype=lambda dtype: np.dtype(dtype))
    package = types.ModuleType("polygraphy")
    package.cuda, package.datatype = cuda, datatype
    package.backend = types.SimpleNamespace(trt=poly_trt)
    for name, module in [("tensorrt", _FakeTrt()), ("polygraphy", package), ("polygraphy.cuda", cuda),
                         ("polygraphy.datatype", datatype), ("polygraphy.backend", package.backend),
                         ("polygraphy.backend.trt", poly_trt)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backends, "_missing_module", lambda requires: None)
    _FakeDeviceArray.uploads = 0
    return builds


def test_wiring_with_a_fake_tensorrt(fake_tensorrt, tmp_path, monkeypatch):
    from conftest import make_test_vocabulary, reference_logits
    from ram_edge.runtime import Tagger

    bundle = make_test_bundle(tmp_path)
    monkeypatch.setenv("RAM_EDGE_TRT_CACHE_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("RAM_EDGE_TRT_MAX_TAGS", "12")
    pixels = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    with Tagger(bundle, providers=["CPUExecutionProvider"]) as reference:
        expected = reference.logits(pixels)
    with Tagger(bundle, backend="tensorrt") as tagger:
        assert len(fake_tensorrt) == 2 and _FakeDeviceArray.uploads == 2  # label_embed + label_mask, once
        decoder = tagger._decoder
        assert not decoder.loaded_from_cache and decoder.gpu == "Fake GPU (sm_87)"
        assert decoder._runner.allocation_strategy == "runtime"
        assert fake_tensorrt[1]["profiles"][0]["label_embed"][2][0] == 12
        assert fake_tensorrt[1]["fp16"] is False and fake_tensorrt[1]["tf32"] is False
        logits = tagger.logits(pixels)
        np.testing.assert_allclose(logits, expected, atol=1e-6)
        again = tagger.logits(pixels[:1])
        np.testing.assert_allclose(logits[:1], again, atol=1e-6)
        np.testing.assert_allclose(logits, expected, atol=1e-6)  # not overwritten by the runner's buffer reuse
        assert _FakeDeviceArray.uploads == 2  # no upload per call
        fed = decoder._runner.feeds[-1]
        assert isinstance(fed["label_embed"], _FakeDeviceArray) and isinstance(fed["image_embeds"], np.ndarray)
        vocab = make_test_vocabulary(num_tags=5, embed_dim=tagger.vocabulary.embed_dim, seed=3)
        tagger.set_vocabulary(vocab)
        assert _FakeDeviceArray.uploads == 4
        np.testing.assert_allclose(tagger.logits(pixels), reference_logits(pixels, vocab), atol=1e-5)
        with pytest.raises(ValueError, match="13 tags.*at most 12"):
            tagger.set_vocabulary(make_test_vocabulary(num_tags=13, embed_dim=tagger.vocabulary.embed_dim))
        assert _FakeDeviceArray.uploads == 4 and len(tagger.vocabulary) == 5
    engines = sorted((tmp_path / "engines").glob("*.engine"))
    assert [p.name.split(".")[0] for p in engines] == ["decoder", "encoder"]
    with Tagger(bundle, backend="tensorrt") as tagger:  # from the cache: no build
        assert len(fake_tensorrt) == 2 and tagger._encoder.loaded_from_cache and tagger._decoder.loaded_from_cache
        np.testing.assert_allclose(tagger.logits(pixels), expected, atol=1e-6)
    engines[0].write_bytes(b"\xff damaged")
    with Tagger(bundle, backend="tensorrt") as tagger:  # a damaged engine is rebuilt
        assert len(fake_tensorrt) == 3 and not tagger._decoder.loaded_from_cache
    monkeypatch.setenv("RAM_EDGE_TRT_FP16", "1")
    with Tagger(bundle, backend="tensorrt"):  # other flags: another key, another engine
        assert len(fake_tensorrt) == 5 and fake_tensorrt[-1]["fp16"] is True
    assert len(list((tmp_path / "engines").glob("*.engine"))) == 4


def test_chunked_vocabulary_beyond_the_profile_with_a_fake_tensorrt(fake_tensorrt, tmp_path, monkeypatch):
    """Chunks of tags are uploaded once each and scored call by call: a vocabulary larger than the engine's
    profile works when every chunk fits it, with the scores of one onnxruntime call."""
    from conftest import make_test_vocabulary
    from ram_edge.runtime import Tagger

    bundle = make_test_bundle(tmp_path)
    monkeypatch.setenv("RAM_EDGE_TRT_CACHE_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("RAM_EDGE_TRT_MAX_TAGS", "12")
    pixels = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    with Tagger(bundle, providers=["CPUExecutionProvider"]) as reference:
        vocab = make_test_vocabulary(num_tags=30, embed_dim=reference.vocabulary.embed_dim, seed=4)
        reference.set_vocabulary(vocab)
        expected = reference.logits(pixels)
    with Tagger(bundle, backend="tensorrt", tag_chunk=12) as tagger:
        uploads = _FakeDeviceArray.uploads
        tagger.set_vocabulary(vocab)  # 30 tags > the profile's 12, in chunks of 12, 12, 6
        assert _FakeDeviceArray.uploads - uploads == 2 * 3 and tagger.tag_chunks() == [(0, 12), (12, 24), (24, 30)]
        np.testing.assert_allclose(tagger.logits(pixels), expected, atol=1e-5)
        assert _FakeDeviceArray.uploads - uploads == 6  # none per call
    with Tagger(bundle, backend="tensorrt", tag_chunk=13) as tagger:
        with pytest.raises(ValueError, match="13 tags.*at most 12"):
            tagger.set_vocabulary(vocab)
