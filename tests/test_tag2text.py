"""Tag2Text in torch against ``golden/tag2text_tiny_384``: tagging (image embeddings, logits, thresholds,
the tags fed to the captioner), the official checkpoint layout (every key consumed or reported, tied
copies), the captioning branch (tag-encoder states, teacher-forced decoder logits, the explicit cache
against uncached decoding) and the captions themselves, token for token, through the torch reference
of generation (``_caption_reference.py``); RAM's captioning branch where its widths allow.

All on the golden's tiny sizes; generation runs per image, as upstream's inference script does.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from ram_edge.models import CheckpointError, demo_model, load_checkpoint
from ram_edge.models.bert import TextDecoder
from ram_edge.models.checkpoint import BUFFER_SUFFIXES, CAPTIONING_PREFIXES
from ram_edge.tags import TAG2TEXT_DELETE_TAG_INDEX, TAG2TEXT_NUM_TAGS

try:
    import _caption_reference as reference_generation
    from _shared import golden_paths, needs_shared
except ImportError:  # tests/ imported as a package
    from tests import _caption_reference as reference_generation
    from tests._shared import golden_paths, needs_shared

TOL = 1e-4
CACHE_TOL = 1e-5
GOLDEN = "tag2text_tiny_384"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generation is hundreds of tiny ops: torch's intra-op thread pool only adds contention there
    (a beam search took 7.6 s with 2 threads on a busy 2-core machine, 0.3 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden(reference):
    """(model loaded from the golden, npz arrays as tensors, golden json, our image_embeds and logits)."""
    pth, npz, js = golden_paths(GOLDEN)
    meta = json.loads(js.read_text())
    model = load_checkpoint(pth, caption_heads=meta["med"]["num_attention_heads"])
    arrays = {k: torch.from_numpy(v) for k, v in np.load(npz).items()}
    # The json: "the model input was pixel_values of ram_plus_tiny_384.npz".
    pixels = torch.from_numpy(np.load(golden_paths("ram_plus_tiny_384")[1])["pixel_values"])
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        logits = model.decode(embeds, *model.default_vocabulary(), **model.default_classifier())
    return model, arrays, meta, embeds, logits


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def tag_states(model, golden_arrays, embeds, mode: str, images=slice(None)) -> torch.Tensor:
    return reference_generation.caption_states(
        model, embeds[images], golden_arrays[f"{mode}_enc_input_ids"][images], golden_arrays[f"{mode}_enc_attention_mask"][images]
    )


# -- tagging ---------------------------------------------------------------------------------------


def test_golden_image_embeds_and_logits(golden):
    model, g, meta, embeds, logits = golden
    config = model.config
    assert (config.kind, config.variant, config.image_size) == ("tag2text", "tag2text_tiny_384", 384)
    assert config.num_tags == TAG2TEXT_NUM_TAGS and config.image_embed_dim == meta["swin"]["vision_width"] == 128
    assert tuple(embeds.shape) == tuple(meta["shapes"]["image_embeds"]) == (2, 145, 128)
    assert max_err(embeds, g["image_embeds"]) <= TOL
    assert max_err(logits, g["logits"]) <= TOL
    assert g["logits"].std().item() > 0.05
    # forward() is the same computation over the default vocabulary.
    with torch.no_grad():
        assert max_err(model(torch.from_numpy(np.load(golden_paths("ram_plus_tiny_384")[1])["pixel_values"])), logits) <= 1e-6


def test_thresholds_and_the_tags_fed_to_the_captioner(golden):
    model, g, meta, _, logits = golden
    thresholds = torch.tensor(model.tags.thresholds)
    assert torch.equal(thresholds, g["class_threshold"])
    assert [model.tags.names[i] for i in (2701, 2828, 1167)] == ["person", "man", "woman"]
    assert tuple(g["delete_tag_index"].tolist()) == TAG2TEXT_DELETE_TAG_INDEX == tuple(meta["delete_tag_index"])
    selected = torch.sigmoid(logits) > thresholds
    assert selected.sum(dim=1).tolist() == meta["n_tags_over_threshold"] == [9, 13]
    selected[:, list(TAG2TEXT_DELETE_TAG_INDEX)] = False
    fed = [" | ".join(model.tags.names[i] for i in torch.nonzero(row).flatten().tolist()) for row in selected]
    assert fed == meta["outputs"]["beam"]["tags_fed"] == meta["outputs"]["greedy"]["tags_fed"]


def test_a_subset_of_the_learned_table_scores_as_in_the_full_one(golden):
    model, _, _, embeds, full = golden
    subset = torch.tensor([2701, 5, 3428, 1167, 0])
    label, mask = model.default_vocabulary()
    fc = model.default_classifier()
    assert label.shape == (TAG2TEXT_NUM_TAGS, 1, 32) and fc["label_fc_weight"].shape == (TAG2TEXT_NUM_TAGS, 32)
    with torch.no_grad():
        part = model.decode(embeds, label[subset], mask[subset], fc["label_fc_weight"][subset], fc["label_fc_bias"][subset])
    assert max_err(part, full[:, subset]) <= 1e-5
    with pytest.raises(ValueError, match=r"Tag2Text scores each tag with its own classifier row"):
        model.decode(embeds, label, mask)


def test_ram_takes_no_per_tag_classifier():
    model = demo_model("ram_tiny_224", num_tags=4)
    label, mask = model.default_vocabulary()
    assert model.default_classifier() == {}
    embeds = torch.zeros(1, model.config.swin.num_tokens, 512)
    with pytest.raises(ValueError, match=r"ram shares one classifier"):
        model.decode(embeds, label, mask, torch.zeros(4, 64), torch.zeros(4))


# -- the checkpoint layout -------------------------------------------------------------------------


def test_every_official_key_is_consumed_or_reported(golden):
    model, _, meta, _, _ = golden
    raw = torch.load(golden_paths(GOLDEN)[0], map_location="cpu", weights_only=True)["model"]
    assert len(raw) == meta["checkpoint_keys"] == 286
    buffers = {k for k in raw if k.endswith(BUFFER_SUFFIXES)}
    ours = {("label_embed.weight" if k == "label_embed" else k) for k in model.state_dict()}
    assert ours | buffers == set(raw) and not ours & buffers
    prefixes = {p: sum(k.startswith(p) for k in ours) for p in meta["checkpoint_keys_by_prefix"]}
    assert prefixes == {p: n - sum(k.startswith(p) for k in buffers) for p, n in meta["checkpoint_keys_by_prefix"].items()}
    notes = " | ".join(model.load_notes)
    assert "renamed label_embed.weight" in notes
    assert f"dropped {len(buffers)} relative_position_index / attn_mask / position_ids buffers" in notes and len(buffers) == 13
    # 32 tagging-head tensors = tag encoder layers 0-1, the LM projection = word embeddings, the LM bias pair.
    assert "34 tensors are stored under a second name because the architecture ties them" in notes


def test_tied_parameters_are_one_tensor(golden):
    model = golden[0]
    head, encoder = model.tagging_head.encoder.layer, model.tag_encoder.encoder.layer
    for i in range(2):
        names = [name for name, _ in head[i].named_parameters()]
        assert len(names) == 16 and {n.split(".")[0] for n in names} == {"crossattention", "intermediate", "output"}
        for name, param in head[i].named_parameters():
            assert encoder[i].get_parameter(name) is param, name
    assert head[0].crossattention.self.num_heads == 4 and encoder[0].crossattention.self.num_heads == 4
    predictions = model.text_decoder.cls.predictions
    assert model.config.captioning.tie_word_embeddings
    assert predictions.decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias
    # The tag encoder's own self-attention is not tied to anything.
    assert encoder[0].attention.self.query.weight is not model.text_decoder.layers[0].attention.self.query.weight


def _golden_state() -> dict:
    return dict(torch.load(golden_paths(GOLDEN)[0], map_location="cpu", weights_only=True)["model"])


@needs_shared
def test_tied_copies_that_differ_are_refused(tmp_path):
    state = _golden_state()
    key = "tag_encoder.encoder.layer.1.intermediate.dense.weight"
    state[key] = state[key].clone() + 0.5  # the file shares storage between the copies: change only one
    path = tmp_path / "inconsistent.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"tagging_head\.encoder\.layer\.1\.intermediate\.dense\.weight and "
                                              r"tag_encoder\.encoder\.layer\.1\.intermediate\.dense\.weight are one tensor"):
        load_checkpoint(path, caption_heads=4)
    # Tagging alone does not read the tag encoder: it loads.
    model = load_checkpoint(path, captioning=False)
    assert not hasattr(model, "tag_encoder")


def test_an_untied_lm_head_loads_as_stored(tmp_path, golden):
    state = _golden_state()
    key = "text_decoder.cls.predictions.decoder.weight"
    state[key] = state[key].clone() * 1.5
    path = tmp_path / "untied.pth"
    torch.save({"model": state}, path)
    model = load_checkpoint(path, caption_heads=4)
    decoder = model.text_decoder
    assert not model.config.captioning.tie_word_embeddings
    assert decoder.cls.predictions.decoder.weight is not decoder.bert.embeddings.word_embeddings.weight
    assert torch.equal(decoder.cls.predictions.decoder.weight, state[key])
    tied = golden[0].text_decoder
    assert torch.equal(decoder.bert.embeddings.word_embeddings.weight, tied.bert.embeddings.word_embeddings.weight)


def test_tagging_only_load_ignores_the_captioning_branch(golden):
    model = load_checkpoint(golden_paths(GOLDEN)[0], captioning=False)
    assert model.config.captioning is None and not hasattr(model, "text_decoder")
    raw = _golden_state()
    branch = sum(k.startswith(CAPTIONING_PREFIXES) for k in raw)
    assert branch == 57 + 64
    assert any(f"ignored {branch} tensors of the captioning branch" in n for n in model.load_notes)
    assert set(model.state_dict()) < set(golden[0].state_dict())
    with torch.no_grad():
        logits = model.decode(golden[3], *model.default_vocabulary(), **model.default_classifier())
    assert max_err(logits, golden[4]) == 0.0
    with pytest.raises(ValueError, match=r"built without its captioning branch"):
        model.encode_tags(golden[3], torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


@needs_shared
def test_caption_heads_are_not_in_the_weights():
    # The official 12 heads do not divide the golden's width 32: the error says what to pass.
    with pytest.raises(CheckpointError, match=r"hidden 32 not divisible by 12 heads .* caption_heads"):
        load_checkpoint(golden_paths(GOLDEN)[0])


# -- the captioning branch -------------------------------------------------------------------------


def test_tag_encoder_states(golden):
    model, g, meta, embeds, _ = golden
    states = tag_states(model, g, embeds, "beam")
    assert tuple(states.shape) == tuple(meta["shapes"]["beam_tag_encoder_out"]) == (2, 40, 32)
    assert max_err(states, g["beam_tag_encoder_out"]) <= TOL
    # Padding matters: the masked positions do not change the real ones.
    ids, mask = g["beam_enc_input_ids"].long(), g["beam_enc_attention_mask"].long()
    n = int(mask[0].sum())
    with torch.no_grad():
        short = model.encode_tags(embeds[:1], ids[:1, :n], mask[:1, :n])
    assert max_err(short, states[:1, :n]) <= 1e-5


def test_greedy_step_logits_and_margins(golden):
    """Teacher-forced on the golden greedy captions: the chosen token's logit and its margin over the
    runner-up ([SEP] excluded below min_length, as the search saw it)."""
    model, g, _, embeds, _ = golden
    caption = model.config.captioning
    states = tag_states(model, g, embeds, "greedy")
    ids = g["greedy_caption_ids"].long()
    with torch.no_grad():
        logits = model.text_decoder(ids, states)
    prompt = len(caption.prompt_ids)
    for b in range(2):
        n = int(g["greedy_caption_len"][b])
        steps = logits[b, prompt - 1 : n - 1]
        tokens = ids[b, prompt:n]
        chosen = steps.gather(1, tokens[:, None])[:, 0]
        others = steps.scatter(1, tokens[:, None], -float("inf"))
        others[: caption.min_length - prompt, caption.eos_token_id] = -float("inf")
        assert max_err(chosen, g["greedy_step_logit"][b, : n - prompt]) <= TOL
        assert max_err(chosen - others.max(dim=1).values, g["greedy_step_margin"][b, : n - prompt]) <= TOL


def _cached_and_uncached(decoder, ids: torch.Tensor, states: torch.Tensor):
    """Logits of ``ids[:, :23]`` decoded with the cache (the prompt, then one token at a time, then a
    chunk of three) and re-run whole without one."""
    config = decoder.config
    batch = ids.shape[0]
    with torch.no_grad():
        uncached = decoder(ids, states)
        cross = decoder.cross_kv(states)
        assert tuple(cross.shape) == (config.num_layers, 2, batch, config.num_heads, states.shape[1], config.head_dim)
        logits, past = decoder.step(ids[:, :4], cross)
        pieces = [logits]
        for t in range(4, 20):
            logits, past = decoder.step(ids[:, t : t + 1], cross, past)
            assert tuple(past.shape) == (config.num_layers, 2, batch, config.num_heads, t + 1, config.head_dim)
            pieces.append(logits)
        logits, past = decoder.step(ids[:, 20:23], cross, past)
        pieces.append(logits)
        assert past.shape[4] == 23
        # A prefix run alone gives the prefix's logits: no later token leaks back through the mask.
        prefix = decoder(ids[:, :23], states)
    return torch.cat(pieces, dim=1), uncached[:, :23], prefix


def test_cached_decoding_equals_uncached(golden):
    """The explicit cache (positions offset by the past, causal mask, concatenation) against re-running
    the whole prefix: exact in float64; in float32 a few ulp, as GEMMs of 1 and of 23 rows round apart."""
    model, g, _, embeds, _ = golden
    states = tag_states(model, g, embeds, "greedy")
    ids = g["greedy_caption_ids"].long()  # (2, 30), image 1 zero-padded after [SEP]: still valid ids
    cached, uncached, prefix = _cached_and_uncached(model.text_decoder, ids, states)
    assert tuple(cached.shape) == (2, 23, model.config.captioning.text_decoder.vocab_size)
    # Measured 1.7e-5 on logits up to 32 (ulp 3.8e-6): bound at 1e-6 of the largest logit, ~8 ulp.
    assert max_err(cached, uncached) <= 1e-6 * uncached.abs().max().item()
    assert max_err(prefix, uncached) <= CACHE_TOL
    decoder64 = copy.deepcopy(model.text_decoder).double()
    cached, uncached, prefix = _cached_and_uncached(decoder64, ids, states.double())
    assert max_err(cached, uncached) <= 1e-10 and max_err(prefix, uncached) <= 1e-10


CAPTION_CASES = [
    ("beam", "beam", False),
    ("greedy", "greedy", False),
    ("user_tags", "user_tags", False),
    ("beam_legacy", "beam", True),
    ("user_tags_legacy", "user_tags", True),
]


@pytest.mark.parametrize("golden_name, inputs, legacy", CAPTION_CASES, ids=[c[0] for c in CAPTION_CASES])
def test_captions_token_for_token(golden, golden_name, inputs, legacy):
    model, g, _, embeds, _ = golden
    for b in range(2):
        states = tag_states(model, g, embeds, inputs, slice(b, b + 1))
        if golden_name == "greedy":
            out = reference_generation.greedy(model, states)
        else:
            out = reference_generation.beam_search(model, states, legacy=legacy)
        n = int(g[f"{golden_name}_caption_len"][b])
        assert out.shape == (1, n), f"image {b}: {out.shape[1]} tokens, golden {n}"
        assert out[0].tolist() == g[f"{golden_name}_caption_ids"][b, :n].tolist(), f"image {b}"


def test_legacy_scoring_differs_where_the_golden_says(golden):
    meta = golden[2]
    g = golden[1]
    # transformers <= 4.35 ends image 0's beam caption early ([SEP] at 13 instead of running to 30).
    assert meta["outputs_legacy_beam_scoring"]["beam"]["differs_from_4_36"] == [True, False]
    assert g["beam_caption_len"].tolist() == [30, 13] and g["beam_legacy_caption_len"].tolist() == [13, 13]


def test_batched_beam_search_searches_each_image_alone(golden):
    """One call for both images gives each image's own caption (upstream's batched call does not: its
    beam_batched_* goldens repeat image 0's caption, see the json's batched_quirk)."""
    model, g, _, embeds, _ = golden
    out = reference_generation.beam_search(model, tag_states(model, g, embeds, "beam"))
    for b in range(2):
        n = int(g["beam_caption_len"][b])
        assert out[b, :n].tolist() == g["beam_caption_ids"][b, :n].tolist()
        assert (out[b, n:] == 0).all()
    assert g["beam_batched_caption_ids"][1].tolist() == g["beam_batched_caption_ids"][0].tolist() != g["beam_caption_ids"][1].tolist()


# -- RAM's captioning branch -----------------------------------------------------------------------


@needs_shared
def test_ram_tiny_golden_cannot_caption():
    pth = golden_paths("ram_tiny_224")[0]
    with pytest.raises(CheckpointError, match=r"reads 768-wide states but the tag encoder emits 64-wide ones"):
        load_checkpoint(pth, tags=[f"t{i}" for i in range(16)], captioning=True, caption_heads=4)
    # By default RAM loads for tagging only, as before.
    assert load_checkpoint(pth, tags=[f"t{i}" for i in range(16)]).config.captioning is None


@needs_shared
def test_ram_captioning_loads_where_widths_allow(tmp_path):
    """The RAM golden with its text decoder's cross-attention narrowed to the tag encoder's width (the
    shape the official RAM has: 768 = 768) loads with its captioning branch and captions."""
    state = dict(torch.load(golden_paths("ram_tiny_224")[0], map_location="cpu", weights_only=True)["model"])
    for key in [k for k in state if re.match(r"text_decoder\.bert\.encoder\.layer\.\d+\.crossattention\.self\.(key|value)\.weight$", k)]:
        state[key] = state[key][:, :64].clone()
    path = tmp_path / "ram_narrow.pth"
    torch.save({"model": state}, path)
    tags = [f"t{i}" for i in range(16)]
    model = load_checkpoint(path, tags=tags, captioning=True, caption_heads=4)
    captioning = model.config.captioning
    assert model.config.kind == "ram" and captioning.tag_encoder.encoder_width == 512 == model.config.image_embed_dim
    assert model.tagging_head.encoder.layer[1].output.dense.weight is model.tag_encoder.encoder.layer[1].output.dense.weight
    arrays = np.load(golden_paths("ram_tiny_224")[1])
    with torch.no_grad():
        embeds = model.encode_image(torch.from_numpy(arrays["pixel_values"][:1]))
        logits = model.decode(embeds, *model.default_vocabulary())
        assert max_err(logits, torch.from_numpy(arrays["logits"][:1])) <= TOL  # tagging unchanged
        ids = torch.tensor([[captioning.enc_token_id, 3899, 1064, 10424, 102]])
        states = model.encode_tags(embeds, ids, torch.ones_like(ids))
    out = reference_generation.greedy(model, states)
    assert out.shape[0] == 1 and 10 <= out.shape[1] <= captioning.max_length
    assert out[0, :4].tolist() == list(captioning.prompt_ids)
    assert ((out >= 0) & (out < captioning.text_decoder.vocab_size)).all()


# -- demo weights ----------------------------------------------------------------------------------


def test_tag2text_demo_model():
    a, b = demo_model("tag2text_tiny_384", seed=1, num_tags=20), demo_model("tag2text_tiny_384", seed=1, num_tags=20)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert a.tagging_head.encoder.layer[0].crossattention.self.key.weight is a.tag_encoder.encoder.layer[0].crossattention.self.key.weight
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = a(pixels)
    assert logits.shape == (2, 20) and torch.isfinite(logits).all()
    assert logits.std(dim=1).min() > 0.05  # the per-tag rows spread the scores
    assert a.fc.W.shape == (1, 20, 32) and a.label_embed.shape == (20, 32)


class _DecoderStep(torch.nn.Module):
    def __init__(self, decoder: TextDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, cross_kv, past_kv):
        return self.decoder.step(input_ids, cross_kv, past_kv)


def test_decoder_step_traces_with_dynamic_batch_and_lengths(tmp_path):
    """Written for export: traced once (2 rows, 1 new token, 5 cached, 7 tag positions), the ONNX step
    runs at other sizes in onnxruntime (3 rows, 2 new, 9 cached, 11 tag positions; and 0 cached: the
    prompt) and agrees with torch. Phase 2 adds it as a GraphSpec; this proves no size got baked in."""
    import warnings

    import onnxruntime as ort

    decoder = demo_model("tag2text_tiny_384", num_tags=4).text_decoder
    config = decoder.config
    layers, heads, head_dim = config.num_layers, config.num_heads, config.head_dim
    generator = torch.Generator().manual_seed(0)

    def inputs(batch, new, past, tags):
        return (
            torch.randint(0, config.vocab_size, (batch, new), generator=generator),
            torch.randn(layers, 2, batch, heads, tags, head_dim, generator=generator),
            torch.randn(layers, 2, batch, heads, past, head_dim, generator=generator),
        )

    path = tmp_path / "text_decoder_step.onnx"
    names = ["input_ids", "cross_kv", "past_kv"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            _DecoderStep(decoder).eval(),
            inputs(2, 1, 5, 7),
            str(path),
            input_names=names,
            output_names=["logits", "present_kv"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "new"},
                "cross_kv": {2: "batch", 4: "tag_positions"},
                "past_kv": {2: "batch", 4: "past"},
                "logits": {0: "batch", 1: "new"},
                "present_kv": {2: "batch", 4: "total"},
            },
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, new, past, tags in ((3, 2, 9, 11), (1, 4, 0, 40)):
        feed = inputs(batch, new, past, tags)
        logits, present = session.run(None, {n: t.numpy() for n, t in zip(names, feed)})
        with torch.no_grad():
            want_logits, want_present = decoder.step(*feed)
        assert logits.shape == (batch, new, config.vocab_size) and present.shape == (layers, 2, batch, heads, past + new, head_dim)
        assert np.abs(logits - want_logits.numpy()).max() <= 1e-5
        assert np.abs(present - want_present.numpy()).max() <= 1e-6
