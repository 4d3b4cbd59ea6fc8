"""Loading official RAM / RAM++ / Tag2Text checkpoints (and bare state dicts, and safetensors) into ``RAMTagger``.

The one place where the upstream layout is mapped to ours (cf. timm's ``checkpoint_filter_fn``):
buffers dropped, ``vision_multi`` and Tag2Text's ``label_embed.weight`` renamed, the captioning branch
kept (Tag2Text, or when asked) or ignored, tensors stored twice because upstream ties them checked
equal, the architecture inferred from tensor shapes. A pickle never runs code:
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ram_edge.tags import OFFICIAL_NUM_TAGS, TagSet, read_tag_file

from .config import PRESETS, CaptionConfig, DecoderConfig, RAMConfig, SwinConfig, TextConfig
from .tagging import RAMTagger

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

#: Recomputed from the configuration, never loaded.
BUFFER_SUFFIXES = (".relative_position_index", ".attn_mask", ".embeddings.position_ids")
#: The captioning branch (RAM and Tag2Text): not part of tagging.
CAPTIONING_PREFIXES = ("tag_encoder.", "text_decoder.")
#: Tag2Text's label table is an ``nn.Embedding`` upstream; ours is the same (T, E) parameter RAM has.
LABEL_EMBED_RENAMES = {"label_embed.weight": "label_embed"}
#: Default heads of the captioning branch's BERTs (upstream's med_config.json); not in the weights.
CAPTION_HEADS = 12
#: Image size implied by the official window sizes, where the caller gives none.
DEFAULT_IMAGE_SIZE = {12: 384, 7: 224}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def read_state_dict(path: PathLike) -> StateDict:
    """Tensors of a ``.pth``/``.pt`` (``{"model": sd}``, ``{"state_dict": sd}`` or bare) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from e
    with open(path, "rb") as f:
        head = f.read(16)
    # torch.save writes a zip archive (b"PK") or, in the legacy format, a pickle (b"\x80" PROTO). Anything
    # else (an HTML error page, a Git LFS pointer, an empty file) is no checkpoint: say so rather than
    # letting the unpickler report it as blocked code or fail with a bare KeyError.
    if not head.startswith((b"PK", b"\x80")):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle; starts with {head!r}): "
            "empty, an HTML error page or a Git LFS pointer? Download it again."
        )
    if _is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's first line suggests weights_only=False; the useful line names the blocked global.
        detail = next((line for line in lines if "global" in line.lower()), lines[0] if lines else type(e).__name__)
        raise CheckpointError(
            f"{path}: refused, the file holds Python objects that would run code when unpickled "
            f"({detail}). Only tensors are loaded; convert it to safetensors from a trusted source."
        ) from e
    except Exception as e:  # truncated zip or legacy pickle: RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, probably truncated or corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download it again."
        ) from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__}, expected a state dict of tensors")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, not_tensors[:5]))}")
    return obj


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``, e.g. OpenAI's ``ViT-B-16.pt``): a zip with compiled code
    beside the pickled data. ``torch.load(weights_only=True)`` refuses these."""
    if not _is_zip(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class _ScriptObject:
    """Stands in for a scripted module (``__torch__.*`` class) while unpickling: keeps its attributes."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


#: The storage classes a pickle may name (``torch.FloatStorage`` ...), by the dtype they hold.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's ``data.pkl`` without running its code: scripted classes become
    inert attribute holders, tensors are rebuilt from the archive's storages, anything else is refused."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self._archive, self._prefix, self._source = archive, prefix, source
        self._storages: Dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        if (module, name) in self._ALLOWED:
            import collections

            return {"OrderedDict": collections.OrderedDict}.get(name) or getattr(torch._utils, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a tensors-only read")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        if key not in self._storages:
            dtype = storage_type.dtype
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self._storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self._storages[key]


def read_torchscript_tensors(path: PathLike) -> StateDict:
    """Every tensor attribute of a TorchScript archive, named by its attribute path as ``state_dict()``
    names it (``transformer.resblocks.0.attn.in_proj_weight``). No pickled or TorchScript code runs."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            data = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not data:
                raise CheckpointError(f"{path}: a zip archive without data.pkl; not a TorchScript file")
            prefix = data[0].rsplit("/", 1)[0]
            with archive.open(data[0]) as f:
                root = _TensorsOnlyUnpickler(f, archive, prefix, str(path)).load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, the TorchScript archive holds more than modules and tensors ({e})") from e
    except Exception as e:  # truncated zip, missing storage record, ...
        raise CheckpointError(
            f"{path}: not a readable TorchScript archive, probably truncated or corrupt ({type(e).__name__}: {e}). "
            "Download it again."
        ) from e

    tensors: StateDict = {}

    def walk(obj, prefix: str) -> None:
        if isinstance(obj, _ScriptObject):
            for name, value in obj.state.items():
                walk(value, f"{prefix}{name}.")
        elif isinstance(obj, torch.Tensor):
            tensors[prefix[:-1]] = obj.detach().requires_grad_(False)

    walk(root, "")
    if not tensors:
        raise CheckpointError(f"{path}: a TorchScript archive without tensors")
    return tensors


def _strip_module_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key  # saved from DistributedDataParallel


def detect_kind(keys) -> str:
    """``"ram_plus"`` (has ``reweight_scale``), ``"tag2text"`` (a group-wise classifier ``fc.W``) or ``"ram"``."""
    keys = {_strip_module_prefix(k) for k in keys}
    if "reweight_scale" in keys:
        return "ram_plus"
    if "fc.W" in keys:
        return "tag2text"
    return "ram"


def has_captioning_branch(keys) -> bool:
    return any(_strip_module_prefix(k).startswith(CAPTIONING_PREFIXES) for k in keys)


def clean_state_dict(state_dict: StateDict, *, captioning: bool = False) -> Tuple[StateDict, List[str]]:
    """Map the upstream layout to ours. Returns the tensors to load and one-line notes of what was done.

    ``captioning`` keeps ``tag_encoder.*`` / ``text_decoder.*``; otherwise they are ignored.
    """
    cleaned: StateDict = {}
    dropped_buffers, ignored, renamed, renamed_labels = 0, 0, 0, 0
    for key, value in state_dict.items():
        key = _strip_module_prefix(key)
        if key.startswith(CAPTIONING_PREFIXES) and not captioning:
            ignored += 1
            continue
        if key.endswith(BUFFER_SUFFIXES):
            dropped_buffers += 1
            continue
        if "vision_multi" in key:
            key = key.replace("vision_multi", "tagging_head")
            renamed += 1
        if key in LABEL_EMBED_RENAMES:
            key = LABEL_EMBED_RENAMES[key]
            renamed_labels += 1
        cleaned[key] = value
    notes = []
    if ignored:
        notes.append(f"ignored {ignored} tensors of the captioning branch (tag_encoder.*, text_decoder.*): tagging does not use them")
    if renamed:
        notes.append(f"renamed {renamed} vision_multi.* keys to tagging_head.* (older release)")
    if renamed_labels:
        notes.append("renamed label_embed.weight (Tag2Text's label table) to label_embed")
    if dropped_buffers:
        notes.append(f"dropped {dropped_buffers} relative_position_index / attn_mask / position_ids buffers (recomputed)")
    return cleaned, notes


def _require(state_dict: StateDict, key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source}: missing key {key!r}; this is not a RAM / RAM++ / Tag2Text checkpoint")
    return state_dict[key]


def _layer_indices(state_dict: StateDict, prefix: str) -> List[int]:
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight$")
    return sorted(int(m.group(1)) for m in map(layer_re.match, state_dict) if m)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two stored tensors hold the same values: one storage (``torch.load`` keeps upstream's
    sharing), or equal. Meta tensors (shapes only) count as the same: nothing says they differ."""
    if a.shape != b.shape:
        return False
    if a.is_meta or b.is_meta or (a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()):
        return True
    return torch.equal(a, b)


def _text_config(state_dict: StateDict, prefix: str, heads: int, source: str) -> TextConfig:
    word = _require(state_dict, f"{prefix}embeddings.word_embeddings.weight", source)
    positions = _require(state_dict, f"{prefix}embeddings.position_embeddings.weight", source)
    layers = _layer_indices(state_dict, prefix)
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: cannot find the layers {prefix}encoder.layer.<i> of the captioning branch")
    cross = _require(state_dict, f"{prefix}encoder.layer.0.crossattention.self.key.weight", source)
    intermediate = state_dict[f"{prefix}encoder.layer.0.intermediate.dense.weight"]
    return TextConfig(
        hidden_size=word.shape[1],
        num_heads=heads,
        intermediate_size=intermediate.shape[0],
        num_layers=len(layers),
        vocab_size=word.shape[0],
        max_positions=positions.shape[0],
        encoder_width=cross.shape[1],
    )


def infer_captioning(state_dict: StateDict, *, heads: int = CAPTION_HEADS, source: str = "checkpoint") -> CaptionConfig:
    """The captioning branch's sizes from ``tag_encoder.*`` / ``text_decoder.*``; ``heads`` is not in the weights."""
    try:
        tag_encoder = _text_config(state_dict, "tag_encoder.", heads, source)
        text_decoder = _text_config(state_dict, "text_decoder.bert.", heads, source)
        lm_weight = _require(state_dict, "text_decoder.cls.predictions.decoder.weight", source)
        tied = _same_values(lm_weight, state_dict["text_decoder.bert.embeddings.word_embeddings.weight"])
        return CaptionConfig(tag_encoder=tag_encoder, text_decoder=text_decoder, tie_word_embeddings=tied)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        hint = "; pass caption_heads (ram-export --caption-heads H)" if "heads" in str(e) else ""
        raise CheckpointError(f"{source}: {e}{hint}") from e


def infer_config(
    state_dict: StateDict,
    *,
    image_size: Optional[int] = None,
    decoder_heads: int = 4,
    num_tags: Optional[int] = None,
    captioning: Optional[bool] = None,
    caption_heads: int = CAPTION_HEADS,
    source: str = "checkpoint",
) -> RAMConfig:
    """The architecture, from tensor shapes; what shapes cannot tell comes from the arguments.

    ``captioning``: ``True`` describes the captioning branch too (an error if the weights have none),
    ``False`` never; ``None`` does for Tag2Text when the weights have it, not for RAM (tagging only).
    """
    kind = detect_kind(state_dict)
    patch = _require(state_dict, "visual_encoder.patch_embed.proj.weight", source)
    embed_dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]

    depths, heads, windows = [], [], []
    block_re = re.compile(r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")
    blocks: Dict[int, Dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = block_re.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"{source}: cannot find the Swin stages (visual_encoder.layers.<i>.blocks.<j>)")
    for stage in range(len(blocks)):
        depths.append(len(blocks[stage]))
        table = blocks[stage][0]
        heads.append(table.shape[1])
        windows.append((math.isqrt(table.shape[0]) + 1) // 2)
    window = max(windows)
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE.get(window, 384)

    # Tag2Text's own layout names the table label_embed.weight (clean_state_dict renames it).
    label_key = "label_embed.weight" if "label_embed" not in state_dict and "label_embed.weight" in state_dict else "label_embed"
    label_rows, embed_out = _require(state_dict, label_key, source).shape
    if kind in ("ram", "tag2text"):
        tags_in_weights = label_rows
        if num_tags is not None and num_tags != label_rows:
            raise CheckpointError(
                f"{source}: {'RAM' if kind == 'ram' else 'Tag2Text'} checkpoint has {label_rows} tag embeddings "
                f"but {num_tags} tags were given"
            )
    else:
        if num_tags is None:
            if label_rows % OFFICIAL_NUM_TAGS:
                raise CheckpointError(
                    f"{source}: label_embed has {label_rows} rows, not a multiple of the official {OFFICIAL_NUM_TAGS} tags; "
                    "pass the tag list (--tags FILE) or num_tags so descriptions per tag can be worked out"
                )
            num_tags = OFFICIAL_NUM_TAGS
        if label_rows % num_tags:
            raise CheckpointError(f"{source}: label_embed has {label_rows} rows, not divisible by {num_tags} tags")
        tags_in_weights = num_tags

    if kind == "tag2text":
        classifier = _require(state_dict, "fc.W", source)  # (1, T, H)
        hidden = classifier.shape[2]
        if classifier.shape[1] != label_rows:
            raise CheckpointError(f"{source}: fc.W scores {classifier.shape[1]} tags but label_embed has {label_rows}")
    else:
        hidden = _require(state_dict, "wordvec_proj.weight", source).shape[0]
    layers = _layer_indices(state_dict, "tagging_head.")
    if not layers:
        raise CheckpointError(f"{source}: no tagging_head.encoder.layer.<i> tensors; not a RAM tagging checkpoint")
    intermediate = state_dict[f"tagging_head.encoder.layer.{layers[0]}.intermediate.dense.weight"].shape[0]

    if captioning is None:
        captioning = kind == "tag2text" and has_captioning_branch(state_dict)
    caption_config = None
    if captioning:
        if kind == "ram_plus":
            raise CheckpointError(f"{source}: RAM++ has no captioning branch")
        if not has_captioning_branch(state_dict):
            raise CheckpointError(f"{source}: no captioning branch (tag_encoder.*, text_decoder.*) in these weights")
        caption_config = infer_captioning(state_dict, heads=caption_heads, source=source)

    try:
        return RAMConfig(
            kind=kind,
            swin=SwinConfig(
                image_size=image_size,
                patch_size=patch_size,
                in_chans=in_chans,
                embed_dim=embed_dim,
                depths=tuple(depths),
                num_heads=tuple(heads),
                window_size=window,
            ),
            decoder=DecoderConfig(hidden_size=hidden, num_heads=decoder_heads, intermediate_size=intermediate, num_layers=len(layers)),
            embed_dim=embed_out,
            num_tags=tags_in_weights,
            descriptions_per_tag=label_rows // tags_in_weights,
            captioning=caption_config,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _architecture(config: RAMConfig) -> RAMConfig:
    """What a preset name stands for: the tagging architecture (the captioning branch is loaded or not)."""
    return replace(config, variant="custom", captioning=None)


def match_preset(config: RAMConfig) -> str:
    """Name of the preset with this exact tagging architecture, else ``"custom"``."""
    for name, candidate in PRESETS.items():
        if _architecture(candidate) == _architecture(config):
            return name
    return "custom"


def state_dict_problems(expected: Mapping[str, torch.Tensor], state_dict: StateDict) -> List[str]:
    """Missing keys, unexpected keys and wrong shapes of ``state_dict`` against ``expected``, one line each
    kind (empty: they match)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {'; '.join(wrong[:8])}")
    return problems


def check_state_dict(model: torch.nn.Module, state_dict: StateDict, source: str) -> None:
    """Refuse missing keys, unexpected keys and wrong shapes, naming them."""
    problems = state_dict_problems(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{source}: does not match the {model.config.kind} architecture: " + " | ".join(problems))


def tied_key_groups(model: torch.nn.Module) -> List[List[str]]:
    """State-dict keys that name one parameter of ``model`` (two or more names each)."""
    groups: Dict[int, List[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def check_tied_tensors(model: torch.nn.Module, state_dict: StateDict, source: str) -> int:
    """Refuse a checkpoint whose copies of one tied parameter differ; returns how many copies are redundant.

    Upstream ties the tagging head to the tag encoder's first layers and the LM head's bias to its
    projection's, so every checkpoint it saves holds equal copies; different copies mean the file was
    not saved from that model, and loading would silently pick one.
    """
    redundant = 0
    for keys in tied_key_groups(model):
        first = state_dict[keys[0]]
        differing = [k for k in keys[1:] if not _same_values(first, state_dict[k])]
        if differing:
            raise CheckpointError(
                f"{source}: {keys[0]} and {differing[0]} are one tensor in the architecture (upstream ties them) "
                "but differ in this checkpoint; it was not saved from upstream's model"
            )
        redundant += len(keys) - 1
    return redundant


def as_tag_set(tags: Union[TagSet, Sequence[str], PathLike]) -> TagSet:
    """A TagSet from a TagSet, a list of names or a tag file (one name a line)."""
    if isinstance(tags, TagSet):
        return tags
    if isinstance(tags, (str, os.PathLike)):
        return TagSet(read_tag_file(tags), source=str(tags))
    return TagSet(list(tags))


def load_checkpoint(
    path: PathLike,
    *,
    image_size: Optional[int] = None,
    decoder_heads: int = 4,
    tags: Union[None, TagSet, Sequence[str], PathLike] = None,
    variant: Optional[str] = None,
    captioning: Optional[bool] = None,
    caption_heads: int = CAPTION_HEADS,
) -> RAMTagger:
    """Build the model a checkpoint describes and load it, in eval mode.

    ``image_size`` defaults to 384 for window 12 and 224 for window 7 (the official pairs); ``tags`` is a
    TagSet, a list of names or a tag file (default: the shipped vocabulary when the checkpoint has 4,585
    or 3,429 tags). ``variant`` names a preset the checkpoint must match (a check, not a source of shapes).
    ``captioning`` loads the captioning branch (``tag_encoder.*``, ``text_decoder.*``): by default for
    Tag2Text, not for RAM; ``caption_heads`` is its BERTs' head count (not in the weights; official 12).
    """
    source = str(path)
    raw = read_state_dict(path)
    if captioning is None:
        captioning = detect_kind(raw) == "tag2text" and has_captioning_branch(raw)
    state_dict, notes = clean_state_dict(raw, captioning=captioning)
    tag_set = None if tags is None else as_tag_set(tags)
    num_tags = None if tag_set is None else len(tag_set)
    config = infer_config(
        state_dict,
        image_size=image_size,
        decoder_heads=decoder_heads,
        num_tags=num_tags,
        captioning=captioning,
        caption_heads=caption_heads,
        source=source,
    )
    if variant is not None:
        wanted = PRESETS.get(variant)
        if wanted is None:
            raise CheckpointError(f"unknown variant {variant!r}; known: {', '.join(sorted(PRESETS))}")
        if replace(_architecture(wanted), num_tags=config.num_tags, descriptions_per_tag=config.descriptions_per_tag) != _architecture(config):
            raise CheckpointError(f"{source}: the weights are not a {variant} model (inferred {config})")
    config = replace(config, variant=variant or match_preset(config))
    model = RAMTagger(config, tag_set)
    check_state_dict(model, state_dict, source)
    redundant = check_tied_tensors(model, state_dict, source)
    if redundant:
        notes.append(
            f"{redundant} tensors are stored under a second name because the architecture ties them (the tagging "
            "head is the tag encoder's first layers, the LM head's bias is its projection's): checked equal, loaded once"
        )
    model.load_state_dict(state_dict, strict=True)
    for note in notes:
        log.info("%s: %s", Path(source).name, note)
    model.load_notes = notes
    return model.eval()
