"""The open Miipher-2 reimplementation's checkpoints (github.com/Atotti/miipher-2), read safely and mapped onto
the pipeline's modules bit for bit (``python -m pipeline.import_checkpoint`` records them as runs).

It saves its adapter training as ``torch.save`` of ``{"step", "model_state_dict", "optimizer_state_dict", ...,
"config", "random_states"}`` whose model state holds the whole mHuBERT-147 (``extractor.model.*``, Hugging Face
names) and the adapters (``adapters.<i>.ff.{0,1,3}.*``: LayerNorm, Linear, Linear), and its vocoder as a
Lightning checkpoint (``state_dict`` with ``generator.*``, ``multi_period_discriminator.*``,
``multi_scale_discriminator.*``, old-style weight-norm names).

Files are read with ``torch.load(weights_only=True)``. Beyond tensors and plain containers, only OmegaConf
containers (its configs) and NumPy arrays (its RNG states) are allowed; anything else is refused with what to
do. Every tensor a module needs must come from the file with its shape, or the import is refused naming the key
(``ImportRefused``). The checkpoint's copy of the frozen encoder is compared with the model in ``ssl.weights``
(``check_same_encoder``): the checkpoint keeps the *trained* final norms of the adapted layers, not the originals
that make the clean target.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ImportRefused(ValueError):
    """A file that cannot be imported; the message names it, the key and what to do."""


# --------------------------------------------------------------------------------------------
# Reading the files safely
# --------------------------------------------------------------------------------------------


def _safe_globals() -> list[Any]:
    """What the reimplementation's pickles hold besides tensors: OmegaConf containers (its configs,
    Lightning's hyper_parameters) and NumPy arrays (its RNG states). Plain data classes whose
    unpickling runs no code of the file's choosing; every other global is refused."""
    import typing

    import numpy as np
    from numpy._core import multiarray
    from omegaconf import DictConfig as _DictConfig
    from omegaconf import ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)]
    numpy_globals = [
        np.ndarray,
        np.dtype,
        *dtypes,
        multiarray._reconstruct,
        multiarray.scalar,
        # the names NumPy 1.x pickles use for the same functions
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]
    return [
        _DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        BytesNode,
        FloatNode,
        IntegerNode,
        PathNode,
        StringNode,
        typing.Any,
        dict,
        list,
        int,
        float,
        str,
        bool,
        defaultdict,
        *numpy_globals,
    ]


def load_foreign(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with the small allowlist above; a clear refusal otherwise."""
    if not path.is_file():
        raise ImportRefused(f"{what} checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Can only build [^\n]*)", str(err))
        raise ImportRefused(
            f"refusing to load the {what} checkpoint {path}: it holds Python objects that loading would have "
            f"to construct ({found.group(1) if found else str(err).splitlines()[0]}), which could run code. "
            "If you trust the file, keep only its tensors: in an isolated environment, load it once with "
            "unpickling allowed (torch.load with weights_only set to false), save the state dict alone "
            "(torch.save(checkpoint['model_state_dict'] or checkpoint['state_dict'], 'weights.pt')) and import that."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ImportRefused(f"cannot read the {what} checkpoint {path}: {err}") from err


def tensors_of(obj: Any, path: Path, what: str, wrappers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj`` (under one of ``wrappers``, or ``obj`` itself)."""
    for key in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ImportRefused(
            f"the {what} checkpoint {path} holds no state dict of tensors "
            f"(looked at the top level and under {', '.join(wrappers)})"
        )
    return obj


# --------------------------------------------------------------------------------------------
# Key names: theirs -> ours
# --------------------------------------------------------------------------------------------

# Old-style torch.nn.utils weight/spectral norm names -> torch.nn.utils.parametrizations names
WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
SPECTRAL_NORM = {
    "weight_orig": "parametrizations.weight.original",
    "weight_u": "parametrizations.weight.0._u",
    "weight_v": "parametrizations.weight.0._v",
}


def modern_norm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old-style weight-norm and spectral-norm parameters to the parametrization names; a
    module with ``weight_orig`` is spectral-normed (its ``weight_v`` is the power-iteration vector)."""
    spectral = {k[: -len("weight_orig")] for k in state if k.endswith("weight_orig")}
    out = {}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        prefix = f"{module}." if module else ""
        table = SPECTRAL_NORM if prefix in spectral else WEIGHT_NORM
        out[prefix + table.get(name, name)] = value
    return out


def generator_key(key: str, kernels_per_stage: int) -> str:
    """Their generator's names -> ours (pipeline.models.hifigan.Generator)."""
    if key.startswith(("input_projection.", "output_projection.")):
        return f"prenet.{key}"
    match = re.match(r"conformer(\d+)\.conformer_layers\.0\.(.*)", key)
    if match:
        return f"prenet.conformer.conformer_layers.{int(match.group(1)) - 1}.{match.group(2)}"
    match = re.match(r"resblocks\.(\d+)\.(convs1|convs2|convs)\.(.*)", key)
    if match:
        stage, block = divmod(int(match.group(1)), kernels_per_stage)
        kind = "plain" if match.group(2) == "convs2" else "dilated"
        return f"blocks.{stage}.{block}.{kind}.{match.group(3)}"
    return re.sub(r"^conv_pre\.", "pre.", re.sub(r"^conv_post\.", "post.", key))


def discriminator_key(key: str) -> str:
    return re.sub(r"\.conv_post\.", ".post.", key)


def fit(
    module: torch.nn.Module,
    source: dict[str, torch.Tensor],
    rename: Callable[[str], str],
    what: str,
    path: Path,
    theirs_for: Callable[[str], str] = lambda key: f"the pipeline's {key}",
) -> dict[str, str]:
    """Load ``source`` (their names) into ``module`` through ``rename``; every key of the module must
    come from the file with the same shape, or the import is refused naming the key. Returns
    {our key: their key}."""
    renamed = modern_norm_names(source)
    theirs = dict(zip(renamed, source))  # modernised name -> original name in the file
    mapped = {rename(k): v for k, v in renamed.items()}
    origin = {rename(k): theirs[k] for k in renamed}
    own = module.state_dict()
    missing = [k for k in own if k not in mapped]
    if missing:
        raise ImportRefused(
            f"the {what} checkpoint {path} lacks {len(missing)} tensor(s) the {what} needs, e.g. "
            f"{theirs_for(missing[0])}; it does not match the {what} preset"
        )
    for key, value in mapped.items():
        if key not in own:
            raise ImportRefused(
                f"the {what} checkpoint {path} has {origin[key]!r}, which the {what} preset has "
                "no place for; it is another architecture"
            )
        if value.shape != own[key].shape:
            raise ImportRefused(
                f"the {what} checkpoint {path}: {origin[key]!r} has shape {tuple(value.shape)}, the "
                f"preset needs {tuple(own[key].shape)} ({key})"
            )
    module.load_state_dict(mapped, strict=True)
    return origin


# --------------------------------------------------------------------------------------------
# The adapter checkpoint
# --------------------------------------------------------------------------------------------

ADAPTER_PARTS = {"ff.0": "norm", "ff.1": "down", "ff.3": "up"}  # their nn.Sequential -> ours
ENCODER_PREFIXES = ("extractor.model.", "extractor.hubert.")  # older checkpoints say extractor.hubert.


def read_adapter_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(adapter tensors by their name, their encoder's tensors by Hugging Face name, their step)."""
    obj = load_foreign(path, "adapter")
    state = tensors_of(obj, path, "adapter", ("model_state_dict", "state_dict", "model"))
    adapters = {k: v for k, v in state.items() if k.startswith("adapters.")}
    if not adapters:
        raise ImportRefused(
            f"the adapter checkpoint {path} has no 'adapters.<i>.ff.*' tensors; it is not a "
            "Miipher-2 reimplementation adapter checkpoint"
        )
    encoder = {}
    for key, value in state.items():
        for prefix in ENCODER_PREFIXES:
            if key.startswith(prefix):
                encoder[key[len(prefix) :]] = value
    step = int(obj.get("step", 0)) if isinstance(obj, dict) and isinstance(obj.get("step", 0), int) else 0
    return adapters, encoder, step


def adapter_overrides(adapters: dict[str, torch.Tensor], path: Path) -> list[str]:
    """The adapter settings the file's shapes imply (on top of recipe=atotti_miipher2)."""
    indices = sorted({int(k.split(".")[1]) for k in adapters})
    if indices != list(range(len(indices))):
        raise ImportRefused(f"the adapter checkpoint {path} numbers its adapters {indices}; expected 0..n-1")
    down = adapters.get("adapters.0.ff.1.weight")
    if down is None or down.dim() != 2:
        raise ImportRefused(f"the adapter checkpoint {path} lacks 'adapters.0.ff.1.weight' (the down projection)")
    # The reimplementation runs n adapted layers and takes the output of layer n (hidden_states[n]).
    n = len(indices)
    return [f"ssl.layer={n}", f"adapter.num_layers={n}", f"adapter.bottleneck={down.shape[0]}"]


def load_adapters(stage, adapters: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor], path: Path) -> None:
    """Adapters and the adapted layers' trained final norms into the stage's modules."""
    model = stage.model

    def rename_adapter(key: str) -> str:
        _, index, ff, sub, param = key.split(".", 4) if key.count(".") == 4 else ("", "", "", "", key)
        part = ADAPTER_PARTS.get(f"{ff}.{sub}")
        if part is None:
            raise ImportRefused(
                f"the adapter checkpoint {path} has {key!r}, which is not part of a parallel "
                "adapter (LayerNorm ff.0, Linear ff.1, Linear ff.3)"
            )
        return f"{index}.{part}.{param}"

    parts = {ours: theirs for theirs, ours in ADAPTER_PARTS.items()}

    def their_adapter_key(key: str) -> str:  # "1.up.weight" -> 'adapters.1.ff.3.weight'
        index, part, param = key.split(".")
        return repr(f"adapters.{index}.{parts[part]}.{param}")

    fit(model.adapters, adapters, rename_adapter, "adapter", path, their_adapter_key)
    if model.layer_norms is None:
        raise ImportRefused(
            "the reimplementation trains each adapted layer's final_layer_norm: keep "
            "adapter.train_layer_norms=true (recipe=atotti_miipher2) to import its checkpoints"
        )
    norms = {}
    for i in range(len(model.adapters)):
        for param in ("weight", "bias"):
            key = f"encoder.layers.{i}.final_layer_norm.{param}"
            if key not in encoder:
                raise ImportRefused(
                    f"the adapter checkpoint {path} lacks the trained norm "
                    f"'{ENCODER_PREFIXES[0]}{key}' of adapted layer {i}"
                )
            norms[f"{i}.{param}"] = encoder[key]
    fit(model.layer_norms, norms, lambda k: k, "adapter", path)


def check_same_encoder(stage, encoder: dict[str, torch.Tensor], path: Path) -> None:
    """The checkpoint's own copy of the frozen encoder must be the model in ``ssl.weights`` (apart
    from the trained final norms of the adapted layers): adapters only fit the encoder they trained on."""
    if not encoder:
        log.warning(
            "The adapter checkpoint holds no copy of its encoder; trusting ssl.weights=%s", stage.cfg.ssl.weights
        )
        return
    import transformers
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    from pipeline.models.encoder import huggingface_config

    hf_class = transformers.WavLMModel if stage.cfg.ssl.family == "wavlm" else transformers.HubertModel
    theirs = hf_class(huggingface_config(stage.cfg.ssl)).eval()
    wanted = modern_norm_names(encoder)
    try:
        missing, unexpected = theirs.load_state_dict(wanted, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise ImportRefused(
            f"the encoder inside the adapter checkpoint {path} is not a {stage.cfg.ssl.name} model "
            f"({str(err).splitlines()[-1].strip()})"
        ) from err
    missing = [k for k in missing if k != "masked_spec_embed"]
    if missing or unexpected:
        raise ImportRefused(
            f"the encoder inside the adapter checkpoint {path} is not a {stage.cfg.ssl.name} "
            f"model ({'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]})"
        )
    logging.getLogger("torchaudio.models.wav2vec2.utils.import_huggingface").setLevel(logging.ERROR)
    converted = import_huggingface_model(theirs).state_dict()
    adapted = len(stage.model.adapters)
    for key, ours in stage.model.encoder.state_dict().items():
        layer = re.match(r"encoder\.transformer\.layers\.(\d+)\.", key)
        if (
            ".adapter." in key
            or ".trained." in key
            or (layer and int(layer.group(1)) < adapted and "final_layer_norm" in key)
        ):
            continue
        reference = converted[
            key.replace(".feed_forward.feed_forward.", ".feed_forward.").replace(
                ".final_layer_norm.frozen.", ".final_layer_norm."
            )
        ]
        if not torch.equal(ours.cpu(), reference):
            raise ImportRefused(
                f"the adapter checkpoint {path} was trained on another encoder than ssl.weights="
                f"{stage.cfg.ssl.weights}: they differ at {key} (max abs difference "
                f"{(ours.cpu() - reference).abs().max().item():.3g}). Point ssl.weights at the model its adapters "
                "were trained on (mHuBERT-147 for the released checkpoints)."
            )


# --------------------------------------------------------------------------------------------
# The vocoder checkpoint
# --------------------------------------------------------------------------------------------

LIGHTNING_PREFIXES = {
    "generator": "generator.",
    "mpd": "multi_period_discriminator.",
    "msd": "multi_scale_discriminator.",
}


def read_vocoder_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """({generator, mpd, msd: tensors by their names}, their step) from a Lightning checkpoint, a
    {"generator": ...} dict or a bare generator state dict."""
    obj = load_foreign(path, "vocoder")
    if isinstance(obj, dict) and "prenet" in obj:
        raise ImportRefused(
            f"the vocoder checkpoint {path} is the reimplementation's older PreNet + HiFi-GAN "
            "(a 'prenet' entry); only its Conformer SSL-vocoder (Lightning checkpoint) is supported"
        )
    step = obj.get("global_step", obj.get("step", 0)) if isinstance(obj, dict) else 0
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        flat = tensors_of(obj, path, "vocoder", ("state_dict",))
        parts = {
            name: {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
            for name, prefix in LIGHTNING_PREFIXES.items()
        }
    elif isinstance(obj, dict) and isinstance(obj.get("generator"), dict):
        parts = {"generator": tensors_of(obj, path, "vocoder", ("generator",))}
    else:
        parts = {"generator": tensors_of(obj, path, "vocoder", ())}
    if not parts.get("generator"):
        raise ImportRefused(f"the vocoder checkpoint {path} holds no generator weights ('generator.*')")
    return {k: v for k, v in parts.items() if v}, int(step) if isinstance(step, int) else 0


def load_vocoder(stage, parts: dict[str, dict[str, torch.Tensor]], path: Path) -> list[str]:
    """Generator (and discriminators when the file has them) into the stage's modules; returns the
    names of the modules imported."""
    kernels = len(stage.cfg.vocoder.resblock_kernel_sizes)
    fit(stage.modules["generator"], parts["generator"], lambda k: generator_key(k, kernels), "vocoder", path)
    imported = ["generator"]
    for name in ("mpd", "msd"):
        if name in parts:
            fit(stage.modules[name], parts[name], discriminator_key, "vocoder", path)
            imported.append(name)
        else:
            log.warning(
                "The vocoder checkpoint has no %s weights: the %s starts from a fresh initialisation",
                name,
                name.upper(),
            )
    return imported
