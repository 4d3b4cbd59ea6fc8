#!/usr/bin/env python
"""Per-stage latency of a ram-edge bundle against the same model in torch eager, and against the machine.

    python benchmarks/latency.py --demo ram_plus_swin_l_384 --batch 1 8 --tags 100 1000 4585 20000
    python benchmarks/latency.py /tmp/bundles/swinl_fp32 /tmp/bundles/swinl_fp16 --repeats 5

For every bundle (a directory, or ``--demo VARIANT`` exported once into ``--cache-dir`` per precision) and
every onnxruntime execution provider this onnxruntime has (CPU; CUDA and TensorRT when present, else
skipped with a note), it measures after ``--warmup`` calls:

* the pipeline per batch size (``--batch``) at the bundle's vocabulary: preprocess (decode + resize +
  normalise a JPEG per image), encoder, decoder, post-processing (sigmoid, thresholds, sorted tags);
* the decoder (+ post-processing) per vocabulary size (``--tags``; vocabularies larger than the bundle's
  are synthesized: random unit-norm rows with the bundle's descriptions per tag), with a linear fit;
* swapping in a ``--swap-tags`` vocabulary (building the float32 arrays, binding them, first call);
* the machine's matmul peak (best of ``--peak-repeats`` large sgemm calls in onnxruntime and torch), and
  each stage's achieved GFLOP/s from MACs counted off the model configuration;
* memory per engine: what loading it added to the process (RSS) and the peak working memory of one
  batch-1 image through encoder and decoder at the bundle's vocabulary (the kernel's high-water mark,
  reset before each engine), and the whole run's peak RSS.
* with ``--openvino f32 bf16``: the fp32 bundles on OpenVINO at those precisions and int8 bundles on OpenVINO;
* with ``--eval-images``: every engine's accuracy report against the onnxruntime fp32 engine (top-10
  agreement, flipped decisions, max probability error) beside its speed, and a speed-vs-agreement plot.

Engines are measured interleaved (one call of each per round), so a load change on the machine hits
all of them alike and the ratios stay meaningful. The torch eager fp32 model is rebuilt from the
bundle's manifest (demo weights) or ``--checkpoint``. Writes ``latency.json`` and two PNG plots to
``--out`` (default ``benchmarks/results/``, ignored by git); ``--demo`` bundles are exported once into
``--cache-dir`` (default ``~/.cache/ram-edge/bench``) and reused. The default run on the tiny preset
(``--demo ram_plus_tiny_384 --num-tags 200``) stays under 4 GB; add ``--tags ... 20000`` for the large
vocabulary point. See docs/performance.md for the numbers and how to read them.

``--caption`` measures the caption stage instead (bundles with captioning graphs, e.g. ``--demo
tag2text_swin_b_384``): the tag encoder, the text decoder's step at every position of a caption (the
prompt with an empty cache, then one token against the cache) for 1 and ``--caption-beams`` rows, whole
captions (beam search and greedy) with tokens/s, and in torch the same decoder cached and as upstream
runs it (no cache: the whole prefix again at every step). Writes ``caption_latency.json`` and
``caption_step_vs_position.png``; see docs/captioning.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ram_edge.runtime.tagger import select_tags, sigmoid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "examples" / "images" / "demo4.jpg"
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ram-edge" / "bench"
STAGES = ("preprocess", "encoder", "decoder", "postprocess")
PERCENTILES = (50, 90, 99)


def log(message: str) -> None:
    print(f"[latency] {message}", file=sys.stderr, flush=True)


# -- pure functions (tested in tests/test_benchmarks.py) -----------------------------------------------


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Seconds -> {n, min, mean, p50, p90, p99} (linear interpolation between order statistics)."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    out = {"n": int(values.size), "min": float(values.min()), "mean": float(values.mean())}
    for q in PERCENTILES:
        out[f"p{q}"] = float(np.percentile(values, q))
    return out


def encoder_macs(config: dict) -> int:
    """Multiply-accumulates of one image through the encoder (Swin + image_proj), from a RAMConfig dict.

    Per block on L tokens of width C with N tokens per window: qkv 3LC^2, attention 2LNC (scores and
    weighted sum), projection LC^2, MLP 2*r*LC^2. Patch merging: (L/4)*4C*2C. Elementwise ops excluded.
    """
    swin = config["swin"]
    size, patch, dim = swin["image_size"], swin["patch_size"], swin["embed_dim"]
    ratio, window_cfg = swin["mlp_ratio"], swin["window_size"]
    res = size // patch
    macs = res * res * dim * swin["in_chans"] * patch * patch  # patch embedding conv
    stages = len(swin["depths"])
    for stage, depth in enumerate(swin["depths"]):
        c, r = dim * 2**stage, res // 2**stage
        tokens, window = r * r, min(window_cfg, r)
        per_block = tokens * c * c * (3 + 1 + 2 * ratio) + 2 * tokens * window * window * c
        macs += depth * per_block
        if stage < stages - 1:
            macs += (tokens // 4) * (4 * c) * (2 * c)
    c_out, r_out = dim * 2 ** (stages - 1), res // 2 ** (stages - 1)
    macs += (1 + r_out * r_out) * c_out * config["embed_dim"]  # image_proj on every output token
    return int(macs)


def decoder_macs(config: dict, num_tags: int, batch: int = 1, descriptions: Optional[int] = None) -> int:
    """Multiply-accumulates of the decoder for ``batch`` images and ``num_tags`` tags.

    Per tag and image: RAM++ reweighting 2*D*E (scores, weighted sum), wordvec_proj E*H, per layer
    query H^2 + attention 2*H*N + output H^2 + feed-forward 2*H*I, fc H. Per image: key and value
    projections 2*N*E*H per layer.
    """
    dec = config["decoder"]
    e, h, i, layers = config["embed_dim"], dec["hidden_size"], dec["intermediate_size"], dec["num_layers"]
    swin = config["swin"]
    n = 1 + (swin["image_size"] // swin["patch_size"] // 2 ** (len(swin["depths"]) - 1)) ** 2
    d = config["descriptions_per_tag"] if descriptions is None else descriptions
    reweight = 2 * d * e if config["kind"] == "ram_plus" else 0
    per_tag = reweight + e * h + layers * (2 * h * h + 2 * h * n + 2 * h * i) + h
    per_image = layers * 2 * n * e * h
    return int(batch * (num_tags * per_tag + per_image))


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """Least-squares y = slope * x + intercept, with R^2."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.size < 2:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan")}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2)}


def synthetic_vocabulary(num_tags: int, descriptions: int, dim: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(T, D, E) float32 random unit-norm rows and an all-true (T, D) mask."""
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((num_tags, descriptions, dim), dtype=np.float32)
    embed /= np.linalg.norm(embed, axis=-1, keepdims=True)
    return embed, np.ones((num_tags, descriptions), dtype=np.bool_)


def postprocess(logits: np.ndarray, thresholds: np.ndarray, names: Sequence[str]) -> list:
    """What Tagger.tag does after the decoder (the runtime's own functions): sigmoid, per-tag
    thresholds, most probable first."""
    return select_tags(sigmoid(logits), thresholds, names)


def ratios(table: Dict[str, Dict[str, float]], baseline: str) -> Dict[str, Dict[str, float]]:
    """{engine: {stage: seconds}} -> {engine: {stage: baseline seconds / engine seconds}} (speed-up)."""
    base = table[baseline]
    return {
        engine: {stage: base[stage] / value for stage, value in stages.items() if stage in base and value > 0}
        for engine, stages in table.items()
    }


# -- machine -----------------------------------------------------------------------------------------


def machine_info(threads: Optional[int]) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "threads": threads}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {"numpy": np.__version__}
    for module in ("onnxruntime", "torch", "onnx"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    info["versions"] = versions
    return info


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(threads: Optional[int], repeats: int, shape: Tuple[int, int, int] = (1024, 1536, 6144)) -> dict:
    """Best-of-``repeats`` fp32 matmul throughput (GFLOP/s) of a transformer-sized (M, K) x (K, N)."""
    m, k, n = shape
    flops = 2.0 * m * k * n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    out = {"shape": [m, k, n]}
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out["onnxruntime_gflops"] = flops / _best_of(lambda: session.run(None, {"a": a}), repeats) / 1e9
    try:
        import torch

        ta, tw = torch.from_numpy(a), torch.from_numpy(w)
        out["torch_gflops"] = flops / _best_of(lambda: torch.mm(ta, tw), repeats) / 1e9
    except ImportError:
        pass
    out["peak_gflops"] = max(v for key, v in out.items() if key.endswith("_gflops"))
    return out


# -- memory ------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mib() -> Optional[float]:
    """The process's resident set now (Linux), MiB."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> Optional[float]:
    """The high-water mark of this process's RSS, MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def memory_probe(spec: dict) -> dict:
    """Run in a fresh interpreter (``--memory-probe``): load one engine, then one batch-1 image through its
    encoder and decoder at the bundle's vocabulary. Returns the RSS after import, after loading and the
    peak; a fresh process, because an allocator that already holds freed memory hides new allocations."""
    from ram_edge.runtime.preprocess import Preprocessor
    from ram_edge.vocabulary import Vocabulary

    bundle = load_bundle(Path(spec["bundle"]))
    base = rss_mib()
    if spec["kind"] == "torch":
        engine = TorchEngine(bundle, spec["threads"], spec.get("checkpoint"))
    else:
        engine = OrtEngine(bundle, spec["providers"], spec["name"], spec["threads"], tuned=spec.get("tuned", True))
    vocab = Vocabulary.load(bundle.path / bundle.manifest["vocabulary"]["dir"])
    engine.set_vocabulary(vocab.embeddings, vocab.mask)
    loaded = rss_mib()
    pixels = Preprocessor(bundle.manifest["model"]["image_size"], exif_transpose=False)(Path(spec["image"]).read_bytes())[None]
    engine.decode(engine.encode(pixels))
    return {"base_mib": base, "loaded_mib": loaded - base, "peak_mib": peak_rss_mib(),
            "working_peak_mib": max(0.0, peak_rss_mib() - loaded)}


def measure_memory(specs: List[dict]) -> Dict[str, dict]:
    """``memory_probe`` of every engine, each in its own process (sequentially, so they do not compete)."""
    out = {}
    for spec in specs:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            out[spec["name"]] = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            log(f"memory probe {spec['name']} failed: {out[spec['name']]['error']}")
            continue
        out[spec["name"]] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {spec['name']}: loaded +{out[spec['name']]['loaded_mib']:.0f} MiB, peak {out[spec['name']]['peak_mib']:.0f} MiB")
    return out


# -- engines -----------------------------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["model"]["config"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]


def load_bundle(path: Path) -> Bundle:
    manifest = json.loads((path / "manifest.json").read_text())
    return Bundle(path, manifest)


class Engine:
    """Encoder + decoder of one bundle on one backend; the vocabulary is set once, not per call."""

    name = "engine"

    def set_vocabulary(self, embed: np.ndarray, mask: np.ndarray) -> None: ...

    def encode(self, pixels: np.ndarray) -> np.ndarray: ...

    def decode(self, embeds: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class OrtEngine(Engine):
    """tuned=True: ram_edge.ort_tuning session options and the vocabulary bound once (IOBinding).
    tuned=False: what a plain InferenceSession(level ALL) with session.run(numpy feeds) gives."""

    def __init__(self, bundle: Bundle, providers: list, label: str, threads: Optional[int], tuned: bool = True):
        import onnxruntime as ort

        from ram_edge import ort_tuning

        self.name = label
        self.tuned = tuned
        self.threads = threads
        if tuned:
            make = lambda: ort_tuning.session_options(threads)  # noqa: E731
        else:
            def make():
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                if threads:
                    options.intra_op_num_threads = threads
                return options
        graphs = bundle.manifest["graphs"]
        self.encoder = ort.InferenceSession(str(bundle.path / graphs["encoder"]["file"]), make(), providers=providers)
        self.decoder = ort.InferenceSession(str(bundle.path / graphs["decoder"]["file"]), make(), providers=providers)
        self.providers = self.encoder.get_providers()
        self._pixel_name = self.encoder.get_inputs()[0].name
        names = [i.name for i in self.decoder.get_inputs()]
        self._embeds_name, self._label_embed_name, self._label_mask_name = names
        self._bound = ort_tuning.BoundSession(self.decoder) if tuned else None
        self._encoder_bound = ort_tuning.BoundSession(self.encoder) if tuned else None
        self._vocab: Dict[str, np.ndarray] = {}

    def set_vocabulary(self, embed: np.ndarray, mask: np.ndarray) -> None:
        feeds = {self._label_embed_name: embed, self._label_mask_name: mask}
        if self._bound is not None:
            self._bound.set_constants(feeds)
        else:
            self._vocab = feeds

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        if self._encoder_bound is not None:
            return next(iter(self._encoder_bound.run({self._pixel_name: pixels}).values()))
        return self.encoder.run(None, {self._pixel_name: pixels})[0]

    def decode(self, embeds: np.ndarray) -> np.ndarray:
        if self._bound is not None:
            return next(iter(self._bound.run({self._embeds_name: embeds}).values()))
        return self.decoder.run(None, {self._embeds_name: embeds, **self._vocab})[0]

    def close(self) -> None:
        self._bound = self._encoder_bound = None
        self.encoder = self.decoder = None


class TorchEngine(Engine):
    """The same model in torch eager fp32 (the baseline every ratio is against)."""

    def __init__(self, bundle: Bundle, threads: Optional[int], checkpoint: Optional[str], device: str = "cpu"):
        import torch

        from ram_edge.models import RAMConfig, demo_model, load_checkpoint

        self.torch = torch
        self.device = torch.device(device)
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        source = bundle.manifest["model"].get("source", "")
        if checkpoint:
            model = load_checkpoint(checkpoint)
        elif source.startswith("demo:seed="):
            model = demo_model(RAMConfig.from_dict(bundle.config), seed=int(source.split("=", 1)[1]))
        else:
            raise SystemExit(f"{bundle.path}: not a demo bundle (source {source!r}); pass --checkpoint for the torch baseline")
        self.model = model.float().eval().to(self.device)
        self.name = f"torch-eager-{device}-fp32"
        self._embed = self._mask = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def set_vocabulary(self, embed: np.ndarray, mask: np.ndarray) -> None:
        import warnings

        with warnings.catch_warnings():  # read-only arrays (Vocabulary's): torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            self._embed = self.torch.from_numpy(embed).to(self.device)
            self._mask = self.torch.from_numpy(mask).to(self.device)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model.encode_image(self.torch.from_numpy(pixels).to(self.device)).cpu().numpy()
        self._sync()
        return out

    def decode(self, embeds: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model.decode(self.torch.from_numpy(embeds).to(self.device), self._embed, self._mask).cpu().numpy()
        self._sync()
        return out

    def close(self) -> None:
        self.model = None


class OpenVINOEngine(Engine):
    """Both graphs of a bundle on the runtime's OpenVINO backend (CPU) at ``inference_precision`` "f32" or
    "bf16" (bf16 falls back to f32 on CPUs without native bf16; ``precision`` says what was compiled)."""

    def __init__(self, bundle: Bundle, inference_precision: str, threads: Optional[int], label: str):
        from ram_edge.runtime.backends.openvino import OpenVINOBackend

        graphs = bundle.manifest["graphs"]
        options = {"inference_precision": inference_precision, "num_threads": threads, "cache_dir": None}
        self.encoder = OpenVINOBackend(bundle.path / graphs["encoder"]["file"], **options).activate()
        self.decoder = OpenVINOBackend(bundle.path / graphs["decoder"]["file"], **options).activate()
        self.precision = self.encoder.precision
        self.name = label

    def set_vocabulary(self, embed: np.ndarray, mask: np.ndarray) -> None:
        self.decoder.set_constant_inputs({"label_embed": embed, "label_mask": mask})

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.infer({"pixel_values": pixels})["image_embeds"]

    def decode(self, embeds: np.ndarray) -> np.ndarray:
        return self.decoder.infer({"image_embeds": embeds})["logits"]

    def close(self) -> None:
        self.encoder.deactivate()
        self.decoder.deactivate()


def provider_plan(available: Sequence[str], cache_dir: Path) -> Tuple[List[Tuple[str, list]], List[str]]:
    """[(label, providers)] to measure, and notes on what is skipped."""
    plan, notes = [("cpu", ["CPUExecutionProvider"])], []
    if "CUDAExecutionProvider" in available:
        plan.append(("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    else:
        notes.append("CUDAExecutionProvider not in this onnxruntime build: ORT CUDA skipped")
    if "TensorrtExecutionProvider" in available:
        trt = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir / "trt"),
                                             "trt_fp16_enable": True})
        plan.append(("tensorrt", [trt, "CUDAExecutionProvider", "CPUExecutionProvider"]))
    else:
        notes.append("TensorrtExecutionProvider not in this onnxruntime build: TensorRT skipped")
    return plan, notes


# -- measurement -------------------------------------------------------------------------------------


@dataclass
class Recorder:
    samples: Dict[Tuple, List[float]] = field(default_factory=dict)

    def add(self, key: Tuple, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run_pipeline_sweep(engines, preprocess, image_bytes, batches, vocab, names, thresholds, warmup, repeats, rec):
    for engine in engines:
        engine.set_vocabulary(*vocab)
    for batch in batches:
        log(f"pipeline: batch {batch}, {vocab[0].shape[0]} tags, {warmup} warm-up + {repeats} rounds x {len(engines)} engines")
        for round_ in range(warmup + repeats):
            start = time.perf_counter()
            pixels = np.stack([preprocess(image_bytes) for _ in range(batch)])
            pre = time.perf_counter() - start
            totals = {}
            for engine in engines:
                embeds, t_enc = _timed(engine.encode, pixels)
                logits, t_dec = _timed(engine.decode, embeds)
                _, t_post = _timed(postprocess, logits, thresholds, names)
                totals[engine.name] = pre + t_enc + t_dec + t_post
                if round_ >= warmup:
                    for stage, t in zip(STAGES, (pre, t_enc, t_dec, t_post)):
                        rec.add(("pipeline", engine.name, batch, len(names), stage), t)
                    rec.add(("pipeline", engine.name, batch, len(names), "total"), pre + t_enc + t_dec + t_post)
            log(f"  round {round_ + 1}/{warmup + repeats}" + (" (warm-up)" if round_ < warmup else "")
                + "".join(f"  {name}: {t:.3f}s" for name, t in totals.items()))


def run_tags_sweep(engines, embeds_by_engine, tag_counts, bundle_vocab, descriptions, dim, batch, warmup, repeats, rec, swaps):
    for num_tags in tag_counts:
        if num_tags == bundle_vocab[0].shape[0]:
            embed, mask = bundle_vocab
        elif num_tags < bundle_vocab[0].shape[0]:
            embed, mask = np.ascontiguousarray(bundle_vocab[0][:num_tags]), np.ascontiguousarray(bundle_vocab[1][:num_tags])
        else:
            embed, mask = synthetic_vocabulary(num_tags, descriptions, dim, seed=num_tags)
        thresholds = np.full(num_tags, 0.68, dtype=np.float32)
        names = [f"tag_{i}" for i in range(num_tags)]
        for engine in engines:
            _, t = _timed(engine.set_vocabulary, embed, mask)
            swaps.setdefault(engine.name, {})[num_tags] = t
        log(f"decoder: {num_tags} tags, batch {batch}, {warmup} warm-up + {repeats} rounds")
        for round_ in range(warmup + repeats):
            for engine in engines:
                logits, t_dec = _timed(engine.decode, embeds_by_engine[engine.name])
                _, t_post = _timed(postprocess, logits, thresholds, names)
                if round_ >= warmup:
                    rec.add(("tags", engine.name, batch, num_tags, "decoder"), t_dec)
                    rec.add(("tags", engine.name, batch, num_tags, "postprocess"), t_post)
        del embed, mask
    # Hand every engine the bundle's vocabulary back, so no synthetic table (2 GB at 20k x 51) outlives
    # the sweep: with several engines and the torch model loaded, they add up to the machine's 24 GB.
    for engine in engines:
        engine.set_vocabulary(*bundle_vocab)
    gc.collect()


def measure_swap(engine: OrtEngine, num_tags: int, descriptions: int, dim: int, embeds: np.ndarray, repeats: int) -> dict:
    """Swapping in a new vocabulary on a loaded decoder: widening the stored float16 table to the graph's
    float32 (numpy ``astype`` and ram_edge.ort_tuning.Float16Widener), the mask, binding, and the first
    decoder call after the swap against a steady-state call."""
    from ram_edge.ort_tuning import Float16Widener

    embed16 = synthetic_vocabulary(num_tags, descriptions, dim, seed=1)[0].astype(np.float16)
    counts = np.full(num_tags, descriptions)
    widen = Float16Widener(engine.threads)
    numpy_build, ort_build, bind = [], [], []
    embed = None
    for _ in range(repeats):
        _, t = _timed(embed16.astype, np.float32)
        numpy_build.append(t)
        embed = None  # the previous table stays bound until set_vocabulary; keep at most two alive
        start = time.perf_counter()
        embed = widen(embed16)
        mask = np.arange(descriptions)[None, :] < counts[:, None]
        ort_build.append(time.perf_counter() - start)
        _, t = _timed(engine.set_vocabulary, embed, mask)
        bind.append(t)
    _, first = _timed(engine.decode, embeds)
    _, steady = _timed(engine.decode, embeds)
    return {"engine": engine.name, "num_tags": num_tags, "descriptions": descriptions,
            "float32_bytes": int(embed.nbytes), "float16_to_float32_numpy_s": summarize(numpy_build),
            "float16_to_float32_ort_s": summarize(ort_build), "bind_s": summarize(bind),
            "first_decode_s": first, "steady_decode_s": steady}


def measure_accuracy(engines, reference: str, image_paths: Sequence[Path], preprocess, thresholds) -> Dict[str, dict]:
    """Every engine's accuracy report (ram_edge.calibration.accuracy) against ``reference``'s logits (the
    onnxruntime fp32 engine: the fp32 graphs) on ``image_paths``, the bundle's vocabulary set."""
    from ram_edge.calibration import compare_logits

    pixels = [preprocess(path.read_bytes())[None] for path in image_paths]
    logits = {}
    for engine in engines:
        log(f"accuracy: {engine.name} on {len(pixels)} images")
        logits[engine.name] = np.concatenate([engine.decode(engine.encode(p)) for p in pixels])
    base = logits[reference]
    return {name: compare_logits(base, value, thresholds, reference_name=reference).to_dict()
            for name, value in logits.items()}


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 120 dpi) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speed_vs_agreement(report: dict, out_dir: Path) -> List[str]:
    """Speed-up over torch eager (batch 1, end to end) against top-10 agreement with fp32, one point per
    engine, the flip rate written beside it."""
    accuracy, main = report.get("accuracy"), report["main"]
    speedups = next((v for k, v in main.items() if k.startswith("speedup_vs_")), None)
    if not accuracy or not speedups:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine, acc in accuracy.items():
        if engine not in speedups or "total" not in speedups[engine]:
            continue
        x, y = acc["top10_agreement"], speedups[engine]["total"]
        ax.plot(x, y, "o")
        ax.annotate(f"{engine}\n{acc['flip_rate']:.2%} flipped", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axvline(0.95, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"top-10 agreement with fp32 ({next(iter(accuracy.values()))['images']} images)")
    ax.set_ylabel("speed-up vs torch eager, end to end (batch 1)")
    ax.set_title(f"Speed vs agreement ({main['tags']} tags)")
    ax.grid(alpha=0.3)
    path = save_figure(fig, out_dir / "speed_vs_agreement.png")
    return [str(path)]


# -- report ------------------------------------------------------------------------------------------


def build_report(rec: Recorder, engines, baseline: Optional[str], config: dict, peak: dict, tag_counts, batches, main_tags) -> dict:
    rows = []
    for (sweep, engine, batch, tags, stage), values in sorted(rec.samples.items(), key=lambda kv: str(kv[0])):
        row = {"sweep": sweep, "engine": engine, "batch": batch, "tags": tags, "stage": stage, **summarize(values)}
        macs = None
        if stage == "encoder":
            macs = encoder_macs(config) * batch
        elif stage == "decoder":
            macs = decoder_macs(config, tags, batch)
        if macs:
            row["gmacs"] = macs / 1e9
            row["gflops_p50"] = 2 * macs / row["p50"] / 1e9
            row["fraction_of_peak"] = row["gflops_p50"] / peak["peak_gflops"]
        if stage == "total":
            row["images_per_s"] = batch / row["p50"]
        rows.append(row)
    report = {"rows": rows}
    # Main table: batch 1 (or the smallest), the bundle's vocabulary, p50 per stage, ratios vs torch.
    b0 = min(batches)
    table = {}
    for row in rows:
        if row["sweep"] == "pipeline" and row["batch"] == b0 and row["tags"] == main_tags:
            table.setdefault(row["engine"], {})[row["stage"]] = row["p50"]
    report["main"] = {"batch": b0, "tags": main_tags, "p50_s": table}
    if baseline and baseline in table:
        report["main"]["speedup_vs_" + baseline] = ratios(table, baseline)
    floor = 2 * (encoder_macs(config) + decoder_macs(config, main_tags)) / peak["peak_gflops"] / 1e9
    report["main"]["matmul_floor_s"] = floor
    fits = {}
    for engine in {r["engine"] for r in rows if r["sweep"] == "tags"}:
        pts = sorted((r["tags"], r["p50"]) for r in rows if r["sweep"] == "tags" and r["engine"] == engine and r["stage"] == "decoder")
        fit = fit_linear([p[0] for p in pts], [p[1] for p in pts])
        fit["ms_per_1000_tags"] = fit["slope"] * 1e6
        fits[engine] = fit
    report["decoder_linear_fit"] = fits
    return report


def _machine_title(report: dict) -> str:
    machine = report.get("machine", {})
    return f"{machine.get('Model name', platform.machine())}, {machine.get('threads') or machine.get('cpu_count')} threads"


def plot(report: dict, out_dir: Path) -> List[str]:
    """latency_vs_tags.png (decoder time over vocabulary sizes on a log axis, with the linear fit over the
    measured range) and latency_vs_batch.png (per-image time by batch size: grouped bars for a few batch
    sizes, a line for many)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots (pip install ram-edge[bench])")
        return []
    written = []
    rows = report["rows"]
    machine = _machine_title(report)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for engine in sorted({r["engine"] for r in rows if r["sweep"] == "tags"}):
        pts = sorted((r["tags"], r["p50"] * 1e3) for r in rows if r["sweep"] == "tags" and r["engine"] == engine and r["stage"] == "decoder")
        xs, ys = zip(*pts)
        line, = ax.plot(xs, ys, "o-", label=engine)
        fit = report["decoder_linear_fit"].get(engine)
        if fit and np.isfinite(fit["slope"]) and len(xs) > 1:
            grid = np.geomspace(min(xs), max(xs), 50)
            ax.plot(grid, np.maximum(0.0, fit["slope"] * grid + fit["intercept"]) * 1e3, ":",
                    color=line.get_color(), alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("vocabulary size (tags, log scale)")
    ax.set_ylabel("decoder p50 (ms), batch 1")
    ax.set_title(f"Decoder latency vs vocabulary size (dotted: linear fit)\n{machine}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    path = save_figure(fig, out_dir / "latency_vs_tags.png")
    written.append(str(path))

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    engines = sorted({r["engine"] for r in rows if r["sweep"] == "pipeline"})
    batches = sorted({r["batch"] for r in rows if r["sweep"] == "pipeline"})
    per_image = {(r["engine"], r["batch"]): r["p50"] * 1e3 / r["batch"] for r in rows
                 if r["sweep"] == "pipeline" and r["stage"] == "total"}
    if len(batches) <= 3:  # a few batch sizes: grouped bars, one group per batch size
        width = 0.8 / max(1, len(engines))
        for i, engine in enumerate(engines):
            xs = [j + i * width for j in range(len(batches))]
            bars = ax.bar(xs, [per_image.get((engine, b), np.nan) for b in batches], width, label=engine)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    else:
        for engine in engines:
            ax.plot(batches, [per_image.get((engine, b), np.nan) for b in batches], "o-", label=engine)
        ax.set_xticks(batches)
        ax.set_xlabel("batch size")
    ax.set_ylabel("end-to-end p50 per image (ms)")
    ax.set_title(f"Latency per image vs batch ({report['main']['tags']} tags)\n{machine}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    path = save_figure(fig, out_dir / "latency_vs_batch.png")
    written.append(str(path))
    return written


def print_tables(report: dict, peak: dict) -> None:
    main = report["main"]
    print(f"\nbatch {main['batch']}, {main['tags']} tags: p50 seconds per stage"
          f" (matmul peak {peak['peak_gflops']:.0f} GFLOP/s -> floor {main['matmul_floor_s']:.3f} s/image)")
    stages = STAGES + ("total",)
    print(f"{'engine':34s}" + "".join(f"{s:>12s}" for s in stages))
    for engine, values in main["p50_s"].items():
        print(f"{engine:34s}" + "".join(f"{values.get(s, float('nan')):12.4f}" for s in stages))
    for key, table in main.items():
        if key.startswith("speedup_vs_"):
            print(f"speed-up vs {key[len('speedup_vs_'):]}:")
            for engine, values in table.items():
                print(f"{engine:34s}" + "".join(f"{values.get(s, float('nan')):11.2f}x" for s in stages))
    for engine, fit in report["decoder_linear_fit"].items():
        if not np.isfinite(fit["ms_per_1000_tags"]):  # one --tags value: nothing to fit
            continue
        print(f"decoder fit {engine}: {fit['ms_per_1000_tags']:.1f} ms per 1000 tags + {fit['intercept'] * 1e3:.1f} ms, R^2 {fit['r2']:.4f}")
    memory = report.get("memory_mib")
    if memory and memory["engines"]:  # --no-memory: no probes
        print(f"memory, each engine alone in a fresh process, one image (MiB; this whole run peaked at "
              f"{memory['process_peak']:.0f}):")
        for engine, m in memory["engines"].items():
            if "error" in m:
                print(f"  {engine:32s} failed: {m['error']}")
                continue
            print(f"  {engine:32s} peak {m['peak_mib']:6.0f} = interpreter {m['base_mib']:4.0f} + loaded "
                  f"{m['loaded_mib']:5.0f} + working {m['working_peak_mib']:5.0f}")


# -- main --------------------------------------------------------------------------------------------


def ensure_demo_bundles(variant: str, precisions: Sequence[str], cache_dir: Path, num_tags: Optional[int],
                        calibration_images: Optional[Path] = None, eval_images: Optional[Path] = None) -> List[Path]:
    from ram_edge.export import CalibrationOptions, export_bundle
    from ram_edge.models import demo_model

    paths = []
    model = None
    for precision in precisions:
        suffix = f"-{num_tags}tags" if num_tags else ""
        path = cache_dir / f"{variant}{suffix}-{precision}"
        if not (path / "manifest.json").exists():
            if model is None:
                log(f"building demo model {variant}")
                model = demo_model(variant, num_tags=num_tags)
            log(f"exporting {variant} {precision} bundle to {path}")
            calibration = None
            if precision == "int8":
                if calibration_images is None:
                    raise SystemExit("--precisions int8 with --demo needs --calibration-images DIR")
                calibration = CalibrationOptions(str(calibration_images))
            export_bundle(model, path, precision=precision, source="demo:seed=0", overwrite=True,
                          progress=lambda m: log("  " + m), calibration=calibration,
                          eval_images=eval_images if calibration is not None else None)
        paths.append(path)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python benchmarks/latency.py --demo ram_plus_tiny_384 --num-tags 200 --repeats 3")
    p.add_argument("bundles", nargs="*", type=Path, help="bundle directories (e.g. an fp32 and an fp16 export of one model)")
    p.add_argument("--demo", metavar="VARIANT", help="export this preset with demo weights into --cache-dir (once) and measure it")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], help="with --demo: precisions to export (default fp32 fp16)")
    p.add_argument("--num-tags", type=int, help="with --demo: size of the demo model's default vocabulary")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"where --demo bundles are exported once and reused (default {DEFAULT_CACHE})")
    p.add_argument("--checkpoint", help="official checkpoint for the torch baseline when the bundle is not a demo export")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes for the pipeline sweep (default 1 8)")
    p.add_argument("--tags", nargs="+", type=int, default=[100, 1000, 4585],
                   help="vocabulary sizes for the decoder sweep (default 100 1000 4585; a RAM++ 20000 adds 2 GB)")
    p.add_argument("--swap-tags", type=int, default=4585, help="vocabulary size for the swap measurement (0: skip)")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for onnxruntime and torch (default: all cores)")
    p.add_argument("--peak-repeats", type=int, default=5, help="matmul peak: best of this many calls (default 5)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch eager baseline")
    p.add_argument("--ort-default", action="store_true", help="also measure CPU fp32 with plain session options and numpy feeds (before tuning)")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="JPEG fed to preprocessing")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the per-engine memory probes (each engine reloaded in a fresh process)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"directory for latency.json and the plots (default {DEFAULT_OUT.relative_to(REPO)}/, ignored by git)")
    p.add_argument("--caption", action="store_true", help="measure the caption stage instead (bundles with captioning graphs)")
    p.add_argument("--caption-beams", type=int, default=3, help="with --caption: beams of the beam-search runs (default 3)")
    p.add_argument("--openvino", nargs="*", default=[], choices=["f32", "bf16"], metavar="PRECISION",
                   help="also run every fp32 bundle on OpenVINO at these inference precisions (f32, bf16) and "
                   "every int8 bundle on OpenVINO (pip install ram-edge[openvino])")
    p.add_argument("--calibration-images", type=Path, help="with --demo and int8 in --precisions: calibration photos")
    p.add_argument("--eval-images", type=Path, help="photos for every engine's accuracy report against ORT fp32")
    p.add_argument("--eval-size", type=int, default=16, help="at most this many --eval-images (default 16)")
    args = p.parse_args(argv)
    if args.memory_probe:
        return args
    if not args.bundles and not args.demo:
        p.error("give bundle directories or --demo VARIANT")
    if min(args.batch) < 1 or min(args.tags) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --tags must be positive, --repeats >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
    threads = args.threads or os.cpu_count()
    import onnxruntime as ort

    from ram_edge.runtime.preprocess import Preprocessor

    started = time.perf_counter()
    bundle_paths = list(args.bundles)
    if args.demo:
        bundle_paths += ensure_demo_bundles(args.demo, args.precisions, args.cache_dir, args.num_tags,
                                            args.calibration_images, args.eval_images)
    bundles = [load_bundle(p) for p in bundle_paths]
    configs = {json.dumps(b.config, sort_keys=True) for b in bundles}
    if len(configs) != 1:
        raise SystemExit("all bundles must be exports of the same model configuration (e.g. fp32 and fp16)")
    if args.caption:
        return caption_main(args, bundles, threads, started)
    first = bundles[0]
    config = first.config

    info = machine_info(threads)
    log(f"machine: {info.get('Model name', '?')}, {info['cpu_count']} CPUs, onnxruntime {ort.__version__}, threads {threads}")
    log(f"matmul peak (best of {args.peak_repeats})")
    peak = matmul_peak(threads, args.peak_repeats)
    log(f"  {peak['peak_gflops']:.0f} GFLOP/s ({', '.join(f'{k} {v:.0f}' for k, v in peak.items() if k.endswith('_gflops') and k != 'peak_gflops')})")

    plan, notes = provider_plan(ort.get_available_providers(), args.cache_dir)
    for note in notes:
        log(note)
    engines: List[Engine] = []
    specs: List[dict] = []  # how to rebuild each engine in a fresh process, for the memory probes
    baseline = None
    if not args.no_torch:
        log("loading the torch eager fp32 baseline")
        engines.append(TorchEngine(first, threads, args.checkpoint))
        baseline = engines[-1].name
        specs.append({"kind": "torch", "name": baseline, "bundle": str(first.path), "threads": threads,
                      "checkpoint": args.checkpoint, "image": str(args.image)})
    for bundle in bundles:
        for label, providers in plan:
            name = f"ort-{label}-{bundle.precision}"
            if sum(b.precision == bundle.precision for b in bundles) > 1:
                name += f"[{bundle.path.name}]"
            if args.ort_default and label == "cpu" and bundle.precision == "fp32":
                log(f"loading {name}-default (plain options, numpy feeds)")
                engines.append(OrtEngine(bundle, providers, name + "-default", threads, tuned=False))
            log(f"loading {name}")
            try:
                engines.append(OrtEngine(bundle, providers, name, threads))
                specs.append({"kind": "ort", "name": name, "bundle": str(bundle.path), "providers": providers,
                              "threads": threads, "image": str(args.image)})
            except Exception as e:  # a provider that fails to initialise is reported, not fatal
                notes.append(f"{name}: failed to load ({e}); skipped")
                log(notes[-1])

    for bundle in bundles:
        for ov_precision in (args.openvino if bundle.precision == "fp32" else ["f32"] if bundle.precision == "int8" and args.openvino else []):
            name = f"openvino-{bundle.precision}" + (f"-{ov_precision}" if bundle.precision == "fp32" else "")
            log(f"loading {name}")
            try:
                engine = OpenVINOEngine(bundle, ov_precision, threads, name)
            except ImportError as e:
                notes.append(f"{name}: {e}; skipped")
                log(notes[-1])
                break
            if engine.precision != ov_precision:
                notes.append(f"{name}: OpenVINO compiled {engine.precision} ({engine.encoder.precision_reason})")
                log(notes[-1])
            engines.append(engine)

    from ram_edge.vocabulary import Vocabulary

    vocab = Vocabulary.load(first.path / first.manifest["vocabulary"]["dir"])
    bundle_vocab = (vocab.embeddings, vocab.mask)
    names = list(vocab.names)
    thresholds = vocab.threshold_array(first.manifest["vocabulary"].get("default_threshold", 0.68))
    main_tags = len(names)
    descriptions, dim = bundle_vocab[0].shape[1], bundle_vocab[0].shape[2]
    preprocess = Preprocessor(first.manifest["model"]["image_size"], exif_transpose=False)
    image_bytes = args.image.read_bytes()

    rec = Recorder()
    run_pipeline_sweep(engines, preprocess, image_bytes, sorted(args.batch), bundle_vocab, names, thresholds,
                       args.warmup, args.repeats, rec)

    # Agreement with the baseline on one image (sanity: the engines compute the same thing).
    pixels = preprocess(image_bytes)[None]
    embeds_by_engine, agreement = {}, {}
    for engine in engines:
        engine.set_vocabulary(*bundle_vocab)
        embeds_by_engine[engine.name] = engine.encode(pixels)
        logits = engine.decode(embeds_by_engine[engine.name])
        if baseline:
            if engine.name == baseline:
                base_logits = logits
            agreement[engine.name] = float(np.abs(logits - base_logits).max())

    accuracy = None
    fp32_engines = [e.name for e in engines if e.name == "ort-cpu-fp32" or e.name.startswith("ort-cpu-fp32[")]
    if args.eval_images and fp32_engines:
        from ram_edge.calibration import evaluation_images

        paths = [Path(p) for p in evaluation_images(args.eval_images, args.eval_size)]
        accuracy = measure_accuracy(engines, fp32_engines[0], paths, preprocess, thresholds)
    elif args.eval_images:
        notes.append("--eval-images needs an fp32 bundle (the reference): no accuracy measured")

    swaps: Dict[str, Dict[int, float]] = {}
    run_tags_sweep(engines, embeds_by_engine, sorted(args.tags), bundle_vocab, descriptions, dim, min(args.batch),
                   args.warmup, args.repeats, rec, swaps)

    swap_report = []
    if args.swap_tags:
        for engine in engines:
            if isinstance(engine, OrtEngine) and engine.tuned:
                log(f"vocabulary swap: {args.swap_tags} tags on {engine.name}")
                swap_report.append(measure_swap(engine, args.swap_tags, descriptions, dim, embeds_by_engine[engine.name], max(3, args.repeats)))
                engine.set_vocabulary(*bundle_vocab)  # release the 1 GB swap table before the next engine
                gc.collect()

    for engine in engines:  # the probes run one engine at a time: nothing of this process competes
        engine.close()
    gc.collect()
    log("memory: each engine alone in a fresh process, one image")
    memory = measure_memory(specs) if args.memory else {}

    report = build_report(rec, engines, baseline, config, peak, args.tags, args.batch, main_tags)
    report.update({
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "machine": info, "matmul_peak": peak, "notes": notes,
        "bundles": [{"path": str(b.path), "precision": b.precision, "variant": b.manifest["model"]["variant"]} for b in bundles],
        "engines": [e.name for e in engines], "baseline": baseline,
        "macs": {"encoder_per_image": encoder_macs(config), "decoder_per_image_main_tags": decoder_macs(config, main_tags),
                 "decoder_per_tag_per_image": decoder_macs(config, 1) - decoder_macs(config, 0)},
        "max_abs_logit_diff_vs_baseline": agreement, "set_vocabulary_s": swaps, "vocabulary_swap": swap_report,
        "memory_mib": {"engines": memory, "process_peak": peak_rss_mib()},
        "accuracy": accuracy,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "threads": threads, "batch": args.batch, "tags": args.tags},
        "seconds": time.perf_counter() - started,
    })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(report, indent=1))
    report["plots"] = plot(report, args.out) + (plot_speed_vs_agreement(report, args.out) if accuracy else [])
    (args.out / "latency.json").write_text(json.dumps(report, indent=1))
    print_tables(report, peak)
    for s in swap_report:
        print(f"swap {s['num_tags']} tags x {s['descriptions']} ({s['float32_bytes'] / 2**20:.0f} MiB fp32) on {s['engine']}: "
              f"fp16->fp32 numpy {s['float16_to_float32_numpy_s']['p50'] * 1e3:.0f} ms / onnxruntime Cast "
              f"{s['float16_to_float32_ort_s']['p50'] * 1e3:.0f} ms, bind {s['bind_s']['p50'] * 1e3:.2f} ms, "
              f"first decode {s['first_decode_s'] * 1e3:.0f} ms (steady {s['steady_decode_s'] * 1e3:.0f} ms)")
    if agreement:
        print("max |logit - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))
    if accuracy:
        speedups = next((v for k, v in report["main"].items() if k.startswith("speedup_vs_")), {})
        print(f"\naccuracy against {fp32_engines[0]} on {next(iter(accuracy.values()))['images']} images, beside the speed:")
        print(f"{'engine':34s} {'total s':>8s} {'vs torch':>9s} {'top-10':>7s} {'flipped':>8s} {'max|dp|':>8s}")
        for name, acc in accuracy.items():
            total = report["main"]["p50_s"].get(name, {}).get("total", float("nan"))
            ratio = speedups.get(name, {}).get("total", float("nan"))
            print(f"{name:34s} {total:8.3f} {ratio:8.2f}x {acc['top10_agreement']:7.4f} {acc['flip_rate']:8.3%} "
                  f"{acc['max_probability_error']:8.4f}")
    log(f"wrote {args.out / 'latency.json'} and {len(report['plots'])} plots in {report['seconds']:.0f} s")
    return 0


# -- captions ----------------------------------------------------------------------------------------


def torch_caption_model(bundle: Bundle, threads: Optional[int], checkpoint: Optional[str]):
    """The bundle's model in torch eager fp32 (demo weights rebuilt from the manifest, or ``checkpoint``)."""
    import torch

    from ram_edge.models import RAMConfig, demo_model, load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    source = bundle.manifest["model"].get("source", "")
    if checkpoint:
        heads = bundle.config["captioning"]["text_decoder"]["num_heads"]
        return load_checkpoint(checkpoint, captioning=True, caption_heads=heads).float().eval()
    if source.startswith("demo:seed="):
        return demo_model(RAMConfig.from_dict(bundle.config), seed=int(source.split("=", 1)[1])).float().eval()
    raise SystemExit(f"{bundle.path}: not a demo bundle (source {source!r}); pass --checkpoint for the torch baseline")


def step_profile(step: Callable[[int], object], positions: Sequence[int], warmup: int, repeats: int,
                 reset: Callable[[], object] = lambda: None) -> Dict[int, Dict[str, float]]:
    """``step(position)`` timed at every position of a caption, ``repeats`` passes (after ``warmup``):
    position -> summary of seconds. A pass runs ``reset()`` (untimed: the prompt), then the positions in
    order, as generation does."""
    samples: Dict[int, List[float]] = {p: [] for p in positions}
    for round_ in range(warmup + repeats):
        reset()
        for position in positions:
            _, t = _timed(step, position)
            if round_ >= warmup:
                samples[position].append(t)
    return {p: summarize(v) for p, v in samples.items()}


def caption_main(args, bundles: List[Bundle], threads: int, started: float) -> int:
    """The caption stage of each bundle and of its torch model (see the module docstring)."""
    import torch

    from ram_edge.runtime import Tagger
    from ram_edge.runtime.caption import SearchSettings

    info = machine_info(threads)
    log(f"machine: {info.get('Model name', '?')}, {info['cpu_count']} CPUs, threads {threads}; caption stage")
    first = bundles[0]
    caption_config = first.config.get("captioning")
    if not caption_config:
        raise SystemExit(f"{first.path}: no captioning branch in this bundle (Tag2Text; RAM exported with --captioning)")
    model = None if args.no_torch else torch_caption_model(first, threads, args.checkpoint)
    beams = args.caption_beams
    prompt = first.manifest["caption"]["prompt_ids"]
    max_length = first.manifest["caption"]["search"]["max_length"]
    positions = list(range(len(prompt), max_length))  # step at cache length P writes position P
    rng = np.random.default_rng(0)
    tokens = rng.integers(1000, 29000, size=(beams, max_length)).astype(np.int64)
    tokens[:, : len(prompt)] = prompt
    preprocess_image = args.image.read_bytes()
    report: Dict[str, object] = {"kind": "caption", "machine": info, "settings": {
        "repeats": args.repeats, "warmup": args.warmup, "threads": threads, "beams": beams, "max_length": max_length}}
    engines: Dict[str, Dict[str, object]] = {}

    for bundle in bundles:
        name = f"ort-cpu-{bundle.precision}"
        log(f"{name}: loading {bundle.path}")
        with Tagger(bundle.path, providers=["CPUExecutionProvider"], intra_op_threads=threads, exif_transpose=False) as tagger:
            captioner = tagger.captioner
            embeds = tagger.encode(tagger.preprocess(preprocess_image))
            probabilities = sigmoid(tagger.decode(embeds))
            tags = tagger.caption_tags(probabilities)[0]  # upstream's tag prompt of the image
            entry: Dict[str, object] = {"tag_string": tags}
            for round_ in range(args.warmup + args.repeats):
                cross1, t = _timed(captioner.encode_tags, embeds, [tags])
                if round_ >= args.warmup:
                    entry.setdefault("tag_encoder", []).append(t)
            entry["tag_encoder_s"] = summarize(entry.pop("tag_encoder"))
            cross1 = cross1[0]
            for rows in sorted({1, beams}):
                cross = np.repeat(cross1, rows, axis=2)
                state: Dict[str, np.ndarray] = {}

                def prompt_step(rows=rows, cross=cross, state=state):  # the prompt, empty cache
                    _, state["past"] = captioner.step(tokens[:rows, : len(prompt)], cross, captioner.empty_cache(rows))

                def ort_step(position: int, rows=rows, cross=cross, state=state):
                    _, state["past"] = captioner.step(tokens[:rows, position : position + 1], cross, state["past"])

                log(f"{name}: decoder step vs position, {rows} row(s)")
                entry[f"step_s_rows{rows}"] = step_profile(ort_step, positions, args.warmup, args.repeats, prompt_step)
                entry[f"prompt_step_s_rows{rows}"] = summarize([_timed(prompt_step)[1] for _ in range(args.repeats)])
            for label, settings in (("beam", SearchSettings(beams, max_length, 10)), ("greedy", SearchSettings(1, max_length, 10))):
                log(f"{name}: whole caption, {label}")
                times, lengths = [], []
                for round_ in range(args.warmup + args.repeats):
                    # Tag encoder + search, from the tagging decoder's probabilities (as ram-tag --caption runs it).
                    result, t = _timed(lambda: tagger.caption_embeds(embeds, None, probabilities, settings=settings))
                    if round_ >= args.warmup:
                        times.append(t)
                        lengths.append(len(result[0].token_ids) - len(prompt))
                entry[f"caption_{label}_s"] = summarize(times)
                entry[f"caption_{label}_tokens"] = int(np.median(lengths))
                entry[f"caption_{label}_tokens_per_s"] = float(np.median(lengths) / np.median(times))
        engines[name] = entry

    if model is not None:
        decoder = model.text_decoder
        with torch.inference_mode():
            states = torch.from_numpy(np.ascontiguousarray(
                rng.standard_normal((1, first.manifest["caption"]["tag_max_length"], caption_config["tag_encoder"]["hidden_size"]),
                                    dtype=np.float32)))
            ids = torch.from_numpy(tokens)
            for label, cached in (("torch-eager-cpu-fp32-cached", True), ("torch-eager-cpu-fp32-no-cache", False)):
                entry = {}
                for rows in sorted({1, beams}):
                    row_states = states.repeat(rows, 1, 1)
                    cross = decoder.cross_kv(row_states)
                    state = {}

                    def torch_prompt(rows=rows, cross=cross, state=state):
                        if cached:
                            _, state["past"] = decoder.step(ids[:rows, : len(prompt)], cross)

                    def torch_step(position: int, rows=rows, cross=cross, row_states=row_states, state=state):
                        if not cached:  # upstream: the whole prefix again (cross-attention keys too), no cache
                            return decoder(ids[:rows, : position + 1], row_states)
                        _, state["past"] = decoder.step(ids[:rows, position : position + 1], cross, state["past"])

                    log(f"{label}: decoder step vs position, {rows} row(s)")
                    entry[f"step_s_rows{rows}"] = step_profile(torch_step, positions, args.warmup, args.repeats, torch_prompt)
                engines[label] = entry

    # A whole caption's decoding as a sum of its steps (for torch: what generating max_length tokens costs).
    for name, entry in engines.items():
        for rows in sorted({1, beams}):
            profile = entry.get(f"step_s_rows{rows}")
            if profile:
                p50 = [profile[p]["p50"] for p in positions]
                entry[f"step_fit_rows{rows}"] = fit_linear(positions, p50)
                entry[f"all_steps_s_rows{rows}"] = float(np.sum(p50))
                entry[f"last_over_first_step_rows{rows}"] = p50[-1] / p50[0]
    report["engines"] = engines
    report["positions"] = positions
    report["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot_caption(report, args.out, beams)
    (args.out / "caption_latency.json").write_text(json.dumps(report, indent=1, default=str))
    for name, entry in engines.items():
        line = f"{name:32s}"
        if "tag_encoder_s" in entry:
            line += f" tag encoder {entry['tag_encoder_s']['p50'] * 1e3:7.2f} ms"
        for rows in sorted({1, beams}):
            fit = entry.get(f"step_fit_rows{rows}")
            if fit:
                line += (f" | {rows} row(s): step {fit['intercept'] * 1e3 + fit['slope'] * 1e3 * positions[0]:6.2f} ms at "
                         f"{positions[0]}, +{fit['slope'] * 1e6:6.1f} us/position, all steps {entry[f'all_steps_s_rows{rows}']:.3f} s")
        print(line)
        for label in ("beam", "greedy"):
            if f"caption_{label}_s" in entry:
                print(f"{'':32s} caption {label}: {entry[f'caption_{label}_s']['p50']:.3f} s, "
                      f"{entry[f'caption_{label}_tokens']} tokens, {entry[f'caption_{label}_tokens_per_s']:.1f} tokens/s")
    log(f"wrote {args.out / 'caption_latency.json'} in {report['seconds']:.0f} s")
    return 0


def plot_caption(report: dict, out_dir: Path, beams: int) -> List[str]:
    """Step time vs position (the cache keeps it flat; no cache grows with the prefix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots (pip install ram-edge[bench])")
        return []
    positions = report["positions"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in report["engines"].items():
        for rows, style in ((1, "--"), (beams, "-")):
            profile = entry.get(f"step_s_rows{rows}")
            if profile:
                ax.plot(positions, [profile[p]["p50"] * 1e3 for p in positions], style, marker=".",
                        label=f"{name}, {rows} row{'s' if rows > 1 else ''}")
    ax.set_xlabel("position of the new token (prompt = 4 tokens)")
    ax.set_ylabel("text decoder step p50 (ms)")
    ax.set_title("Caption decoder: cost of one token vs caption length")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    path = save_figure(fig, out_dir / "caption_step_vs_position.png")
    return [str(path)]


if __name__ == "__main__":
    sys.exit(main())
