"""benchmarks/latency.py: its pure functions (percentiles, MAC counts, fits, ratios, post-processing),
ram_edge.ort_tuning, and one tiny real run end to end (demo tiny model, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("ram_edge_bench_latency", REPO / "benchmarks" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ram_edge_bench_latency", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_summarize_percentiles(latency):
    s = latency.summarize([float(i) for i in range(1, 101)])  # 1..100
    assert s["n"] == 100 and s["min"] == 1.0 and s["mean"] == 50.5
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    one = latency.summarize([0.25])
    assert one["p50"] == one["p99"] == 0.25
    with pytest.raises(ValueError):
        latency.summarize([])


def test_mac_counts_match_architecture_cost(latency):
    from ram_edge.models import preset

    config = preset("ram_plus_swin_l_384").to_dict()
    # ARCHITECTURE.md "Cost": Swin-L 384 about 104 GMACs; decoder about 12 MMACs per tag per image.
    assert latency.encoder_macs(config) / 1e9 == pytest.approx(104, rel=0.01)
    per_tag = latency.decoder_macs(config, 1) - latency.decoder_macs(config, 0)
    assert 12e6 < per_tag < 13e6
    # Linear in tags and in the batch; RAM has no reweighting term.
    assert latency.decoder_macs(config, 2000, batch=3) == 3 * latency.decoder_macs(config, 2000)
    ram = preset("ram_swin_l_384").to_dict()
    assert latency.decoder_macs(ram, 1) - latency.decoder_macs(ram, 0) == per_tag - 2 * 51 * 512


def test_fit_ratios_vocabulary_postprocess(latency):
    fit = latency.fit_linear([100, 1000, 4585, 20000], [0.002 + 5e-5 * t for t in (100, 1000, 4585, 20000)])
    assert fit["slope"] == pytest.approx(5e-5) and fit["intercept"] == pytest.approx(0.002) and fit["r2"] == pytest.approx(1.0)

    table = {"torch": {"encoder": 2.0, "total": 3.0}, "ort": {"encoder": 1.0, "total": 1.5}}
    assert latency.ratios(table, "torch")["ort"] == {"encoder": 2.0, "total": 2.0}

    embed, mask = latency.synthetic_vocabulary(7, 3, 16, seed=1)
    assert embed.dtype == np.float32 and embed.shape == (7, 3, 16) and mask.all() and mask.shape == (7, 3)
    np.testing.assert_allclose(np.linalg.norm(embed, axis=-1), 1.0, rtol=1e-5)

    logits = np.array([[2.0, -1.0, 0.5], [-3.0, 3.0, 1.0]], dtype=np.float32)
    out = latency.postprocess(logits, np.full(3, 0.6, dtype=np.float32), ["a", "b", "c"])
    assert [list(row.tags) for row in out] == [["a", "c"], ["b", "c"]]
    assert out[0].probabilities[0] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_ort_tuning_bound_session_and_widener():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ram_edge.ort_tuning import BoundSession, Float16Widener, session_options

    # y = x @ W^T summed over the mask, with x per call and W, mask bound once.
    graph = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["w", "m"], ["wm"]),
         helper.make_node("MatMul", ["x", "wm"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, "t"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [3, "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = session_options(1)
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    w, mask = rng.standard_normal((3, 5), dtype=np.float32), rng.random((3, 5)) > 0.3
    bound = BoundSession(session, {"w": w, "mask": mask})
    for batch in (1, 4):  # output shape follows the per-call input
        x = rng.standard_normal((batch, 3), dtype=np.float32)
        np.testing.assert_allclose(bound.run({"x": x})["y"], x @ (w * mask), rtol=1e-5, atol=1e-6)
    w2, mask2 = rng.standard_normal((3, 9), dtype=np.float32), np.ones((3, 9), bool)  # a vocabulary swap
    bound.set_constants({"w": w2, "mask": mask2})
    np.testing.assert_allclose(bound.run({"x": x})["y"], x @ w2, rtol=1e-5, atol=1e-6)

    half = rng.standard_normal((4, 3, 8)).astype(np.float16)
    wide = Float16Widener(1)(half)
    assert wide.dtype == np.float32 and np.array_equal(wide, half.astype(np.float32))


def test_tiny_demo_run_writes_json_and_plots(latency, tmp_path):
    out = tmp_path / "out"
    args = ["--demo", "ram_plus_tiny_384", "--num-tags", "60", "--precisions", "fp32", "--cache-dir", str(tmp_path / "cache"),
            "--batch", "1", "2", "--tags", "20", "120", "--swap-tags", "80", "--repeats", "2", "--warmup", "1",
            "--peak-repeats", "1", "--threads", "2", "--out", str(out), "--ort-default"]
    assert latency.main(args) == 0
    report = json.loads((out / "latency.json").read_text())
    engines = set(report["engines"])
    assert {"torch-eager-cpu-fp32", "ort-cpu-fp32", "ort-cpu-fp32-default"} <= engines
    main = report["main"]
    assert main["batch"] == 1 and main["tags"] == 60
    for engine in engines:
        stages = main["p50_s"][engine]
        assert set(stages) == {"preprocess", "encoder", "decoder", "postprocess", "total"}
        assert all(v > 0 for v in stages.values())
        assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"), rel=0.5)
    assert main["speedup_vs_torch-eager-cpu-fp32"]["torch-eager-cpu-fp32"]["encoder"] == 1.0
    # Every engine computes the same model (demo weights rebuilt from the manifest for torch).
    assert max(report["max_abs_logit_diff_vs_baseline"].values()) < 1e-3
    tags_rows = [r for r in report["rows"] if r["sweep"] == "tags" and r["stage"] == "decoder"]
    assert {r["tags"] for r in tags_rows} == {20, 120}
    assert all(r["p90"] >= r["p50"] and r["gflops_p50"] > 0 for r in tags_rows)
    assert set(report["decoder_linear_fit"]) == engines
    assert report["matmul_peak"]["peak_gflops"] > 0
    swap = report["vocabulary_swap"][0]
    assert swap["num_tags"] == 80 and swap["bind_s"]["p50"] < 1.0
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["plots"]) == 2
    memory = report["memory_mib"]
    assert set(memory["engines"]) == engines - {"ort-cpu-fp32-default"}  # probed: the tuned engines and torch
    for m in memory["engines"].values():
        assert m["loaded_mib"] > 1 and m["working_peak_mib"] >= 0  # weights and vocabulary do take memory
        assert m["peak_mib"] == pytest.approx(m["base_mib"] + m["loaded_mib"] + m["working_peak_mib"], abs=1)
    assert memory["process_peak"] < 4096  # the tiny run stays well inside a 4 GB device


def test_memory_probes(latency):
    before = latency.rss_mib()
    assert before > 0
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    assert latency.rss_mib() >= before + 60 and latency.peak_rss_mib() >= before + 60
    del block


def test_caption_stage_run_writes_json_and_plot(latency, tmp_path):
    """--caption on a tiny Tag2Text demo: tag encoder, decoder step at every position (ORT cached, torch
    cached and upstream's no-cache), whole captions with tokens/s, the step-vs-position plot."""
    out = tmp_path / "out"
    args = ["--demo", "tag2text_tiny_384", "--num-tags", "20", "--precisions", "fp32", "--caption",
            "--cache-dir", str(tmp_path / "cache"), "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--caption-beams", "2", "--out", str(out)]
    assert latency.main(args) == 0
    report = json.loads((out / "caption_latency.json").read_text())
    assert report["positions"] == list(range(4, 30))
    engines = report["engines"]
    assert set(engines) == {"ort-cpu-fp32", "torch-eager-cpu-fp32-cached", "torch-eager-cpu-fp32-no-cache"}
    ort = engines["ort-cpu-fp32"]
    assert ort["tag_encoder_s"]["p50"] > 0 and ort["prompt_step_s_rows2"]["p50"] > 0
    for entry in engines.values():
        for rows in (1, 2):
            steps = entry[f"step_s_rows{rows}"]
            assert sorted(int(p) for p in steps) == report["positions"] and all(s["p50"] > 0 for s in steps.values())
            assert entry[f"all_steps_s_rows{rows}"] > 0 and "slope" in entry[f"step_fit_rows{rows}"]
    for search in ("beam", "greedy"):
        assert 0 < ort[f"caption_{search}_tokens"] <= 26 and ort[f"caption_{search}_tokens_per_s"] > 0
    assert Path(report["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_vs_agreement_plot(latency, tmp_path):
    pytest.importorskip("matplotlib")
    acc = {"images": 4, "top10_agreement": 0.97, "flip_rate": 0.004}
    report = {
        "main": {"tags": 4585, "speedup_vs_torch": {"torch": {"total": 1.0}, "ort-cpu-int8": {"total": 3.2}}},
        "accuracy": {"torch": {**acc, "top10_agreement": 1.0, "flip_rate": 0.0}, "ort-cpu-int8": acc},
    }
    (path,) = latency.plot_speed_vs_agreement(report, tmp_path)
    assert Path(path).stat().st_size > 10_000 and Path(path).name == "speed_vs_agreement.png"
    assert latency.plot_speed_vs_agreement({"main": report["main"], "accuracy": None}, tmp_path) == []
