"""Loading official RAM / RAM++ checkpoints (and bare state dicts, and safetensors) into ``RAMTagger``.

The one place where the upstream layout is mapped to ours (cf. timm's ``checkpoint_filter_fn``):
buffers dropped, ``vision_multi`` renamed, the captioning branch ignored, the architecture inferred from
tensor shapes. A pickle never runs code: ``torch.load(weights_only=True)``.
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
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ram_edge.tags import OFFICIAL_NUM_TAGS, TagSet, read_tag_file

from .config import PRESETS, DecoderConfig, RAMConfig, SwinConfig
from .tagging import RAMTagger

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

#: Recomputed from the configuration, never loaded.
BUFFER_SUFFIXES = (".relative_position_index", ".attn_mask")
#: RAM's captioning branch: not part of tagging.
IGNORED_PREFIXES = ("tag_encoder.", "text_decoder.")
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


def clean_state_dict(state_dict: StateDict) -> Tuple[StateDict, List[str]]:
    """Map the upstream layout to ours. Returns the tagging-path tensors and one-line notes of what was done."""
    cleaned: StateDict = {}
    dropped_buffers, ignored, renamed = 0, 0, 0
    for key, value in state_dict.items():
        if key.startswith("module."):  # saved from DistributedDataParallel
            key = key[len("module.") :]
        if key.endswith(BUFFER_SUFFIXES):
            dropped_buffers += 1
            continue
        if key.startswith(IGNORED_PREFIXES):
            ignored += 1
            continue
        if "vision_multi" in key:
            key = key.replace("vision_multi", "tagging_head")
            renamed += 1
        cleaned[key] = value
    notes = []
    if ignored:
        notes.append(f"ignored {ignored} tensors of the captioning branch (tag_encoder.*, text_decoder.*): tagging does not use them")
    if renamed:
        notes.append(f"renamed {renamed} vision_multi.* keys to tagging_head.* (older release)")
    if dropped_buffers:
        notes.append(f"dropped {dropped_buffers} relative_position_index / attn_mask buffers (recomputed)")
    return cleaned, notes


def _require(state_dict: StateDict, key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source}: missing key {key!r}; this is not a RAM / RAM++ tagging checkpoint")
    return state_dict[key]


def infer_config(
    state_dict: StateDict,
    *,
    image_size: Optional[int] = None,
    decoder_heads: int = 4,
    num_tags: Optional[int] = None,
    source: str = "checkpoint",
) -> RAMConfig:
    """The architecture, from tensor shapes; what shapes cannot tell comes from the arguments."""
    kind = "ram_plus" if "reweight_scale" in state_dict else "ram"
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

    label_rows, embed_out = _require(state_dict, "label_embed", source).shape
    if kind == "ram":
        tags_in_weights = label_rows
        if num_tags is not None and num_tags != label_rows:
            raise CheckpointError(f"{source}: RAM checkpoint has {label_rows} tag embeddings but {num_tags} tags were given")
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

    wordvec = _require(state_dict, "wordvec_proj.weight", source)
    layer_re = re.compile(r"tagging_head\.encoder\.layer\.(\d+)\.intermediate\.dense\.weight$")
    layers = sorted(int(m.group(1)) for m in map(layer_re.match, state_dict) if m)
    if not layers:
        raise CheckpointError(f"{source}: no tagging_head.encoder.layer.<i> tensors; not a RAM tagging checkpoint")
    intermediate = state_dict[f"tagging_head.encoder.layer.{layers[0]}.intermediate.dense.weight"].shape[0]

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
            decoder=DecoderConfig(
                hidden_size=wordvec.shape[0], num_heads=decoder_heads, intermediate_size=intermediate, num_layers=len(layers)
            ),
            embed_dim=embed_out,
            num_tags=tags_in_weights,
            descriptions_per_tag=label_rows // tags_in_weights,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def match_preset(config: RAMConfig) -> str:
    """Name of the preset with this exact architecture, else ``"custom"``."""
    for name, candidate in PRESETS.items():
        if replace(candidate, variant=config.variant) == config:
            return name
    return "custom"


def check_state_dict(model: torch.nn.Module, state_dict: StateDict, source: str) -> None:
    """Refuse missing keys, unexpected keys and wrong shapes, naming them."""
    expected = model.state_dict()
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
    if problems:
        raise CheckpointError(f"{source}: does not match the {model.config.kind} architecture: " + " | ".join(problems))


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
) -> RAMTagger:
    """Build the model a checkpoint describes and load it, in eval mode.

    ``image_size`` defaults to 384 for window 12 and 224 for window 7 (the official pairs); ``tags`` is a
    TagSet, a list of names or a tag file (default: the official vocabulary when the checkpoint has 4,585
    tags). ``variant`` names a preset the checkpoint must match (a check, not a source of shapes).
    """
    source = str(path)
    state_dict, notes = clean_state_dict(read_state_dict(path))
    tag_set = None if tags is None else as_tag_set(tags)
    num_tags = None if tag_set is None else len(tag_set)
    config = infer_config(state_dict, image_size=image_size, decoder_heads=decoder_heads, num_tags=num_tags, source=source)
    if variant is not None:
        wanted = PRESETS.get(variant)
        if wanted is None:
            raise CheckpointError(f"unknown variant {variant!r}; known: {', '.join(sorted(PRESETS))}")
        if replace(wanted, variant="custom", num_tags=config.num_tags, descriptions_per_tag=config.descriptions_per_tag) != config:
            raise CheckpointError(f"{source}: the weights are not a {variant} model (inferred {config})")
    config = replace(config, variant=variant or match_preset(config))
    model = RAMTagger(config, tag_set)
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    for note in notes:
        log.info("%s: %s", Path(source).name, note)
    model.load_notes = notes
    return model.eval()
