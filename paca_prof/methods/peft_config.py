"""A user's PEFT LoraConfig: read from adapter_config.json (as save_pretrained writes it) or
taken from a LoraConfig object, checked, and kept as the plain dict a RunSpec holds.

The file is input from outside: a regular small file holding one JSON object whose keys are
LoraConfig's fields only, LoRA's (or DoRA's, use_dora) peft_type, sizes in range, names that
are strings. Everything else gets one line (ValueError). The method a config trains is lora,
or dora with use_dora. Torch-free at import; checking a config imports PEFT.

Three fields change on the way in, because they do not describe the adapter's shape:
inference_mode is False (a saved adapter says True, which would freeze it), and an
initialisation that reads the base weights (PiSSA, OLoRA, LoftQ, EVA, CorDA, LoRA-GA) becomes
PEFT's default (the weights are random here, and initial values change neither speed nor
memory). megatron_config is refused: PEFT would import the module the file names.
target_parameters (LoRA on 3-D expert parameters, PEFT's ParamWrapper) is simulated as PEFT
runs it; target_modules or target_parameters that match nothing are refused (PEFT only warns).

The regexes of a config (a string target_modules, the keys of rank_pattern and
alpha_pattern) are matched by PEFT with Python's re, which has no time limit: a pattern that
backtracks catastrophically would stall the run. check_patterns_finish matches them against
the model's module paths first, as PEFT will, in a forked process given PATTERN_SECONDS.
Limits: where fork is unavailable (or in a daemon process) that check is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from paca_prof import validate

MAX_FILE_BYTES = 2**20
# What matching a config's regexes against a model's paths may take: microseconds for any
# sane pattern, so a loaded machine's slow fork never refuses one; a runaway one never ends.
PATTERN_SECONDS = 5.0
MAX_NAMES = 10_000
MAX_R = 2**20
PEFT_METHODS = ("lora", "dora")
# init_lora_weights values that only draw random numbers; the others read the base weights.
PLAIN_INITS = (True, False, "gaussian", "orthogonal")


def method_of(fields: dict) -> str:
    """The method a checked config trains: dora with use_dora, else lora."""
    return "dora" if fields.get("use_dora") else "lora"


def read(path: str | Path) -> dict:
    """The checked fields of a PEFT adapter_config.json (a file, or a folder holding one);
    ValueError (one line) for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_config.json"
    data = validate.read_small_file(path, "--peft-config", MAX_FILE_BYTES)
    try:
        values = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"--peft-config {path}: not JSON ({type(error).__name__})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--peft-config {path}: a JSON {type(values).__name__}, not an object "
                         "of LoraConfig fields")
    return check(values, f"--peft-config {path}")


def check(config, where: str = "peft_config") -> dict:
    """The checked, plain fields of a LoraConfig, a dict of its fields, or a path to an
    adapter_config.json: what RunSpec.peft_config holds. ValueError (one line) otherwise."""
    if isinstance(config, str | Path):
        return read(config)
    from peft import LoraConfig

    if isinstance(config, LoraConfig):
        config = config.to_dict()
    elif hasattr(config, "peft_type") and hasattr(config, "to_dict"):
        raise ValueError(f"{where}: a {type(config).__name__}; only LoRA (and DoRA) configs "
                         "can be simulated")
    values = dict(validate.mapping(config, where))
    peft_type = values.pop("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)  # PeftType.LORA from to_dict()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {str(peft_type)[:40]!r}; only LoRA (and DoRA, "
                         "use_dora) configs can be simulated")
    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(k[:40] for k in unknown[:5])}; "
                         "an adapter_config.json holds LoraConfig's fields only")
    _check_fields(values, where)
    if values.get("megatron_config") is not None:
        raise ValueError(f"{where}: megatron_config is not supported (PEFT would import the "
                         "module megatron_core names)")
    values.pop("megatron_core", None)
    values.pop("runtime_config", None)  # not the adapter's shape; a dict in to_dict()
    values["inference_mode"] = False
    if values.get("init_lora_weights", True) not in PLAIN_INITS:
        values["init_lora_weights"] = True
    fields = plain(values)
    try:
        lora_config(fields)
    except Exception as error:  # PEFT raises several types for a bad combination
        message = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{where}: not a valid LoraConfig ({message})") from None
    return fields


def lora_config(fields: dict):
    """The peft.LoraConfig of checked fields (inference_mode False: trainable)."""
    from peft import LoraConfig

    return LoraConfig(**{**fields, "inference_mode": False})


def describe(fields: dict) -> dict:
    """run.yaml's account of a config: its rank, alpha, dropout, targets and patterns first,
    then every field."""
    return {"r": fields.get("r", 8), "alpha": fields.get("lora_alpha", 8),
            "dropout": fields.get("lora_dropout", 0.0),
            "target_modules": fields.get("target_modules"),
            "rank_pattern": fields.get("rank_pattern") or {},
            "alpha_pattern": fields.get("alpha_pattern") or {},
            "use_dora": bool(fields.get("use_dora")), "peft_config": fields}


def _check_fields(values: dict, where: str) -> None:
    """Sizes and types of the fields that shape the adapter (the others PEFT checks)."""
    if "r" in values:
        validate.number(values["r"], f"{where}: r", minimum=1, maximum=MAX_R, integer=True)
    if "lora_alpha" in values:
        validate.number(values["lora_alpha"], f"{where}: lora_alpha", above=0, maximum=1e6)
    if "lora_dropout" in values:
        validate.number(values["lora_dropout"], f"{where}: lora_dropout", minimum=0)
        if values["lora_dropout"] >= 1:
            raise ValueError(f"{where}: lora_dropout must be in [0, 1), got "
                             f"{values['lora_dropout']}")
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        _check_names(values.get(name), f"{where}: {name}")
    for name, rule in (("rank_pattern", dict(minimum=1, maximum=MAX_R, integer=True)),
                       ("alpha_pattern", dict(above=0, maximum=1e6))):
        pattern = values.get(name)
        if pattern is None:
            continue
        validate.mapping(pattern, f"{where}: {name}")
        if len(pattern) > MAX_NAMES:
            raise ValueError(f"{where}: {name} has more than {MAX_NAMES} entries")
        for key, value in pattern.items():
            validate.text(key, f"{where}: {name} key")
            _compile(key, f"{where}: {name} key")
            validate.number(value, f"{where}: {name}[{key[:40]!r}]", **rule)
    if "use_dora" in values and not isinstance(values["use_dora"], bool):
        raise ValueError(f"{where}: use_dora must be true or false")


def _check_names(value, what: str) -> None:
    """None, one regex string, or a list of module names (strings)."""
    if value is None:
        return
    if isinstance(value, str):
        validate.text(value, what)
        _compile(value, what)
        return
    if not isinstance(value, list | tuple | set) or len(value) > MAX_NAMES:
        raise ValueError(f"{what} must be a string (a regex, or all-linear) or a list of at most "
                         f"{MAX_NAMES} names")
    for name in value:
        validate.text(name, f"{what} entry", max_len=1000)


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what}: {pattern[:40]!r} is not a regular expression ({error})") \
            from None


def check_patterns_finish(fields: dict, paths: list[str], where: str = "--peft-config",
                          seconds: float = PATTERN_SECONDS) -> None:
    """ValueError (one line) when the config's regexes do not finish matching `paths` (the
    model's module paths) within `seconds`, matched as PEFT matches them: a string
    target_modules with re.fullmatch, each rank_pattern and alpha_pattern key with
    re.match over "(.*\\.)?(KEY)$". The matching runs in a forked process, killed at the
    deadline (re cannot be interrupted in the process that runs it)."""
    import multiprocessing

    patterns = []
    target_modules = fields.get("target_modules")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        patterns.append(("target_modules", target_modules, target_modules, re.fullmatch))
    for name in ("rank_pattern", "alpha_pattern"):
        for key in fields.get(name) or {}:
            patterns.append((name, key, rf"(.*\.)?({key})$", re.match))
    if (not patterns or "fork" not in multiprocessing.get_all_start_methods()
            or multiprocessing.current_process().daemon):  # a daemon cannot have children
        return
    for field_name, shown, pattern, match in patterns:
        worker = multiprocessing.get_context("fork").Process(
            target=_match_all, args=(pattern, match, paths), daemon=True)
        worker.start()
        worker.join(seconds)
        if worker.is_alive():
            worker.kill()
            worker.join()
            raise ValueError(f"{where}: {field_name} regex {shown[:40]!r} did not finish matching "
                             f"the model's {len(paths)} module paths in {seconds:g} s (PEFT "
                             "matches with Python's re, which has no time limit)")


def _match_all(pattern: str, match, paths: list[str]) -> None:
    for path in paths:
        match(pattern, path)


def plain(value):
    """A config value as JSON and YAML hold it: sets as sorted lists, enums as their value."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(plain(v) for v in value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):
        return value.value  # PEFT's enums (TaskType, PeftType)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
