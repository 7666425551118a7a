"""PaCA adapters on disk, in the authors' format (their PEFT 0.11 fork, tuners/paca).

A folder, as PEFT writes one:
  adapter_config.json          peft_type "PACA", r, paca_alpha, target_modules, ... : exactly
                               the fields of the authors' PacaConfig, so their fork loads it
  adapter_model.safetensors    per adapted linear at module path P (in the plain model):
                                 base_model.model.P.paca_w        (out x r), the weight's dtype
                                 base_model.model.P.paca_indices  (r,) int64
                               per parameter N of a module M in modules_to_save:
                                 base_model.model.M.N

Both directions work: a folder the authors' code wrote loads here (their unsorted indices are
sorted, with paca_w's columns permuted alike: the same trained weight), and a folder written
here loads in their code. paca_w holds P = W[:, idx] / scaling there and here.

Loading checks everything (config fields, names, shapes, dtypes, index ranges) before it
changes the model, and raises ValueError naming the layer.

Also here, deprecated: save_paca / load_paca, the earlier single-file format.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from paca.config import PacaConfig
from paca.layer import check_indices
from paca.model import check_injectable, find_modules_to_save, inject_paca, paca_layers, unwrap
from paca.targets import select_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# The authors' PacaConfig fields (PEFT 0.11's PeftConfig ones first) and the values this
# implementation writes for those it does not use. Their loader takes no other key.
_AUTHORS_DEFAULTS = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "revision": None,
    "task_type": None,
    "inference_mode": True,
    "fan_in_fan_out": False,
    "bias": "none",
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "layer_replication": None,
    "gradient_accumulation_steps": 1,
}
_OURS = ("r", "target_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
         "alpha_pattern", "modules_to_save")


# ------------------------------------------------------------------------ config


def config_to_json(config: PacaConfig, target_paths: list[str], **extra) -> dict:
    """adapter_config.json's content for `config` (the authors' field names only).

    Their fork knows no exclude_modules: when it is set, target_modules is written as a regular
    expression that matches exactly the adapted paths (which both loaders accept).
    """
    out = dict(_AUTHORS_DEFAULTS, peft_type="PACA", paca_alpha=config.alpha)
    out.update({name: getattr(config, name) for name in _OURS})
    if config.exclude_modules is not None:
        out["target_modules"] = "|".join(re.escape(p) for p in target_paths)
        out["layers_to_transform"] = out["layers_pattern"] = None
    for key, value in extra.items():
        if key not in _AUTHORS_DEFAULTS:
            raise ValueError(f"adapter_config.json has no field {key!r}")
        out[key] = value
    return out


def config_from_json(fields: dict, source: str = "adapter config") -> PacaConfig:
    """A PacaConfig from adapter_config.json's fields, ours or the authors'. Raises ValueError
    for another peft_type, unknown fields, or settings this implementation cannot honour."""
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(fields).__name__}")
    if fields.get("peft_type") != "PACA":
        raise ValueError(f"{source}: peft_type is {fields.get('peft_type')!r}, not 'PACA'")
    known = set(_AUTHORS_DEFAULTS) | set(_OURS) | {"peft_type", "paca_alpha", "seed",
                                                     "exclude_modules"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown}")
    refused = {
        "bias": ("none", "training biases"),
        "fan_in_fan_out": (False, "Conv1D (fan_in, fan_out) weights"),
        "layer_replication": (None, "layer replication"),
        "megatron_config": (None, "Megatron layers"),
    }
    for name, (wanted, what) in refused.items():
        if fields.get(name, wanted) != wanted:
            raise ValueError(f"{source}: {name}={fields[name]!r} ({what}) is not supported")
    kwargs = {name: fields[name] for name in _OURS if fields.get(name) is not None}
    if "paca_alpha" in fields:
        kwargs["alpha"] = fields["paca_alpha"]
    for name in ("seed", "exclude_modules"):
        if fields.get(name) is not None:
            kwargs[name] = fields[name]
    try:
        return PacaConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


# ------------------------------------------------------------------------ save


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the authors' key names (on the CPU, contiguous)."""
    model = unwrap(model)
    tensors = {}
    for path, layer in paca_layers(model).items():
        layer.sync_columns()  # any write outside a step reaches the weight, and the file
        tensors[f"{PREFIX}{path}.paca_w"] = layer.paca_weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{path}.paca_indices"] = layer.indices.detach().cpu().long()
    for path in model.__dict__.get("_paca_modules_to_save", {}):
        for name, param in model.get_submodule(path).named_parameters():
            tensors[f"{PREFIX}{path}.{name}"] = param.detach().cpu().contiguous()
    if not tensors:
        raise ValueError("the model has no PaCA layers to save")
    return tensors


def save_pretrained(model: nn.Module, save_directory, **config_fields) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `save_directory` (created
    if needed). Each file is written to a temporary name first and renamed, so a crash never
    leaves a half-written adapter. `config_fields` sets the authors' informational fields
    (base_model_name_or_path, task_type, revision)."""
    plain = unwrap(model)
    config = getattr(plain, "paca_config", None)
    if config is None:
        raise ValueError("the model has no PaCA config: apply PaCA with inject_paca first")
    tensors = adapter_state_dict(plain)
    fields = config_to_json(config, list(paca_layers(plain)), **config_fields)
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / WEIGHTS_NAME,
                      lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    _write_atomically(directory / CONFIG_NAME, lambda path: Path(path).write_text(
        json.dumps(fields, indent=2, sort_keys=True) + "\n"))


def _write_atomically(target: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(prefix="paca-prof-", dir=target.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# ------------------------------------------------------------------------ load


def read_adapter(adapter_path) -> tuple[PacaConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder; ValueError if either file is missing or bad."""
    directory = Path(adapter_path)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise ValueError(f"{directory} is not a PaCA adapter folder: {file.name} is missing")
    try:
        fields = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file}: not readable JSON ({error})") from None
    config = config_from_json(fields, str(config_file))
    try:
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({error})") from None
    return config, tensors


def load_adapter(model: nn.Module, adapter_path, is_trainable: bool = False) -> nn.Module:
    """Apply a saved adapter folder to a base model, in place: the same columns, the same
    trained values. Returns the unwrapped model. With is_trainable=False (PEFT's default) the
    adapter is loaded for inference: nothing requires grad.

    Raises ValueError, before changing the model, if the folder's layers are not the targets
    its config selects in this model, or any tensor does not fit its layer.
    """
    config, tensors = read_adapter(adapter_path)
    outside = sorted(k for k in tensors if not k.startswith(PREFIX))
    if outside:
        raise ValueError(f"{adapter_path}: tensors {outside[:3]} lie outside {PREFIX!r}")
    relative = {k[len(PREFIX):]: v for k, v in tensors.items()}
    return apply_adapter(unwrap(model), config, relative, str(adapter_path), is_trainable)


def apply_adapter(model: nn.Module, config: PacaConfig, tensors: dict[str, torch.Tensor],
                  source: str, is_trainable: bool = True) -> nn.Module:
    """Inject PaCA with `config` and copy `tensors` in: the authors' key names without their
    "base_model.model." prefix, i.e. module paths of the plain model (see load_adapter)."""
    check_injectable(model)
    columns, indices, others = {}, {}, {}
    for path, tensor in tensors.items():
        if path.endswith(".paca_w"):
            columns[path[: -len(".paca_w")]] = tensor
        elif path.endswith(".paca_indices"):
            indices[path[: -len(".paca_indices")]] = tensor
        else:
            others[path] = tensor
    if set(columns) != set(indices):
        raise ValueError(f"{source}: paca_w and paca_indices name different layers: "
                         f"{sorted(set(columns) ^ set(indices))}")
    targets = {t.path: t for t in select_targets(model, config)}
    if set(targets) != set(columns):
        raise ValueError(f"{source} holds layers {sorted(columns)}, the model's targets are "
                         f"{sorted(targets)}")
    sorted_indices, sorted_columns = {}, {}
    for path, target in targets.items():
        linear = target.linear
        where = f"{source}: {path}"
        check_indices(indices[path], target.r, linear.in_features, where)
        if tuple(columns[path].shape) != (linear.out_features, target.r):
            raise ValueError(f"{where}: paca_w has shape {tuple(columns[path].shape)}, expected "
                             f"({linear.out_features}, {target.r})")
        if not columns[path].dtype.is_floating_point:
            raise ValueError(f"{where}: paca_w must be floating point, got {columns[path].dtype}")
        order = indices[path].long().argsort()
        sorted_indices[path] = indices[path].long()[order]
        sorted_columns[path] = columns[path][:, order]
    _check_modules_to_save(model, config, others, source)

    inject_paca(model, config, indices=sorted_indices)
    layers = paca_layers(model)
    with torch.no_grad():
        for path, value in sorted_columns.items():
            layer = layers[path]
            layer.paca_weight.copy_(value.to(layer.paca_weight.device))
            layer.sync_columns()
        for key, value in others.items():
            module_path, _, name = key.rpartition(".")
            param = model.get_submodule(module_path).get_parameter(name)
            param.copy_(value.to(param.device))
    if not is_trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def _check_modules_to_save(model, config, others: dict, source: str) -> None:
    saved = find_modules_to_save(model, config)
    params = dict(model.named_parameters())
    for key, tensor in others.items():
        if key not in params or not any(key.startswith(path + ".") for path in saved):
            raise ValueError(f"{source}: unexpected tensor {PREFIX}{key} (not a PaCA tensor, nor "
                             "a parameter of modules_to_save)")
        if tuple(params[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(params[key].shape)}")


# ------------------------------------------------------------------------ deprecated


def save_paca(model: nn.Module, path) -> None:
    """Deprecated: use PacaModel.save_pretrained (paca.io.save_pretrained). Saves the trained
    columns and their indices in one safetensors file, with the config as metadata."""
    warnings.warn("save_paca is deprecated; use save_pretrained (an adapter folder in the "
                  "authors' format)", DeprecationWarning, stacklevel=2)
    plain = unwrap(model)
    tensors = {}
    for name, layer in paca_layers(plain).items():
        layer.sync_columns()
        tensors[f"{name}.paca_weight"] = layer.paca_weight.detach().contiguous().cpu()
        tensors[f"{name}.indices"] = layer.indices.cpu()
    if not tensors:
        raise ValueError("model has no PacaLinear layers to save")
    config = getattr(plain, "paca_config", None)
    metadata = {"paca_config": json.dumps(config.to_dict() if config else {})}
    save_file(tensors, str(path), metadata=metadata)


def load_paca(model: nn.Module, path) -> nn.Module:
    """Deprecated: use PacaModel.from_pretrained. Applies a save_paca file to a base model
    (in place, trainable); every check runs before the model changes."""
    warnings.warn("load_paca is deprecated; use PacaModel.from_pretrained",
                  DeprecationWarning, stacklevel=2)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        config = PacaConfig(**json.loads(metadata["paca_config"]))
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: no valid paca_config metadata ({error})") from None
    renamed = {}
    for key, tensor in tensors.items():
        key = re.sub(r"^(?:module\.|_orig_mod\.)+", "", key)  # files saved from wrapped models
        if key.endswith(".paca_weight"):
            renamed[key[: -len(".paca_weight")] + ".paca_w"] = tensor
        elif key.endswith(".indices"):
            renamed[key[: -len(".indices")] + ".paca_indices"] = tensor
        else:
            raise ValueError(f"{path}: unexpected tensor {key}")
    return apply_adapter(unwrap(model), config, renamed, str(path))
