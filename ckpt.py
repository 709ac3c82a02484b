"""Persistence: how this project writes and reads weights and training checkpoints, and refuses bad files.

- Weights and exports are safetensors: written atomically (a temp file, then os.replace, so a crash never leaves a
  half file under the real name), read after checking the header against the file size (a truncated download fails
  with one line, not deep inside a memory map).
- Training checkpoints (ckpt.pt) are dicts of tensors and primitives, written atomically by `save_checkpoint` and
  read with torch.load(weights_only=True) by `read_checkpoint`: a pickle that would run code is refused unread.
- Every loader reports ALL its bad keys in one message that names the file ("missing key 'a'; key 'b' has shape
  (3,), expected (4,)"), so a user fixes a file once, not once per key.
Imports only torch and safetensors: the model files (rae.py, dit.py, vae.py) read their files through it.
"""
import json
import os
import re
from dataclasses import fields

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def report(path, problems, hint=""):
    """Raise one ValueError naming `path` and every problem (the first 8, then a count)."""
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(f"{path}: {'; '.join(problems[:8])}{more}{hint}")


# ----------------------------------------------------------------------------- safetensors
def save_safetensors(path, tensors, metadata=None):
    """Write tensors atomically, readable by the group as any file the user writes (safetensors >= 0.8 creates its
    files 0600, unreadable on a shared cluster filesystem). A failed write removes its temp file."""
    tmp = f"{path}.tmp"
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors(path, keep=None):
    """Tensors of a .safetensors file (those whose key passes `keep`), after checking that the file is whole."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if n < 2 or n > size - 8:
            raise ValueError(f"{path}: not a safetensors file or truncated ({size} bytes, header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > size:
        raise ValueError(f"{path}: truncated: tensor data ends at byte {end}, file has {size} bytes")
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}


def read_metadata(path):
    """The string metadata of a safetensors header ({} if none), after the same checks as read_safetensors."""
    read_safetensors(path, keep=lambda k: False)
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def read_json(path, what="a JSON file"):
    """A JSON object (a config.json, a shard index) as a dict; a missing, malformed or non-object file fails in one
    line naming it (`what`: what the file was expected to be, for the missing case)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found (expected {what})")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a JSON {type(obj).__name__}, expected an object")
    return obj


def config_from_metadata(path, meta, key, cls):
    """The dataclass `cls` from the JSON an export keeps in its metadata under `key`. Every field of `cls` must be
    there with the type of its default: a foreign, older or hand-edited file fails naming each bad field."""
    if key not in meta:
        raise ValueError(f"{path}: no '{key}' in the safetensors metadata (not an export of this project)")
    try:
        values = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata '{key}' is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: metadata '{key}' is a JSON {type(values).__name__}, expected an object")
    defaults, problems = {f.name: f.default for f in fields(cls)}, []
    for name in sorted(set(defaults) | set(values)):
        if name not in defaults or name not in values:
            problems.append(f"metadata '{key}' {'has unknown' if name in values else 'is missing'} field '{name}'")
            continue
        want, got = type(defaults[name]), values[name]
        if not (isinstance(got, want) or (want is float and type(got) is int)) or (want is int and type(got) is bool):
            problems.append(f"metadata '{key}' field '{name}' is {got!r}, expected {want.__name__}")
    report(path, problems)
    return cls(**values)


def state_problems(state, expected, prefix="", exact_dtype=False):
    """What keeps `state` from loading where `expected` (name -> tensor) is: unexpected and missing keys, other
    shapes, and other dtypes (exact_dtype; else only a non-float where a float is expected). A list of short
    phrases, empty when all is well."""
    problems = [f"unexpected key '{prefix}{k}'" for k in state if k not in expected]
    for k, want in expected.items():
        got, where = state.get(k), f"key '{prefix}{k}'"
        if got is None:
            problems.append(f"missing {where}")
        elif not isinstance(got, torch.Tensor):
            problems.append(f"{where} is a {type(got).__name__}, expected a tensor")
        elif got.shape != want.shape:
            problems.append(f"{where} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype if exact_dtype else want.is_floating_point() and not got.is_floating_point():
            problems.append(f"{where} has dtype {got.dtype}, expected {want.dtype if exact_dtype else 'a float'}")
    return problems


def load_checked(module, state, path):
    """module.load_state_dict(state) after checking every key, shape and dtype; a bad file names them all."""
    report(path, state_problems(state, module.state_dict()))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return module


# ----------------------------------------------------------------------------- training checkpoints
def save_checkpoint(path, ck):
    """torch.save `ck` to a temp file, then os.replace: a crash mid-write leaves the previous checkpoint intact, and
    a failed write (disk full) removes its temp file."""
    tmp = f"{path}.tmp"
    try:
        torch.save(ck, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    """A dict written by torch.save, read with weights_only=True: tensors, containers and primitives only, so a
    foreign pickle is refused before any of its code runs. Every failure is one line naming the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, KeyError, EOFError, ... by what is wrong
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        first = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's messages run to paragraphs
        why = (f"it pickles {pickled[1]}, so it was refused unread (weights_only=True)" if pickled else
               f"truncated or not written by torch.save ({type(e).__name__}: {first})")
        raise ValueError(f"{path}: not a readable checkpoint: {why}") from None
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a training checkpoint (it holds a {type(ck).__name__}, expected a dict)")
    return ck


def _value_problems(key, got, want):
    """How ck[key] = got differs from what this run has (see check_resume)."""
    if isinstance(want, type):
        return [] if isinstance(got, want) else [f"key '{key}' is a {type(got).__name__}, expected {want.__name__}"]
    if isinstance(want, torch.optim.Optimizer):
        return _optimizer_problems(key, got, want)
    if isinstance(want, dict) and all(isinstance(v, torch.Tensor) for v in want.values()):
        if not isinstance(got, dict):
            return [f"key '{key}' is a {type(got).__name__}, expected a state dict"]
        return state_problems(got, want, f"{key}.", exact_dtype=True)
    if isinstance(got, dict) and isinstance(want, dict):  # the model config: name every field that differs
        return [f"'{key}.{k}' is {got.get(k)!r} in the checkpoint but {want.get(k)!r} in this run"
                for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    return [] if got == want else [f"'{key}' is {got!r} in the checkpoint but {want!r} in this run"]


def _optimizer_problems(key, got, opt):
    groups = got.get("param_groups") if isinstance(got, dict) else None
    if not (isinstance(groups, list) and isinstance(got.get("state"), dict) and
            all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return [f"key '{key}' is not an optimizer state (it needs 'state' and 'param_groups')"]
    sizes, ours = [len(g["params"]) for g in groups], [len(g["params"]) for g in opt.param_groups]
    if sizes != ours:
        return [f"key '{key}' has {sizes} parameters per group, this run's optimizer has {ours}"]
    return [f"key '{key}.state.{pid}.{name}' is {t.dtype} {tuple(t.shape)}, its parameter is {p.dtype} {tuple(p.shape)}"
            for saved, group in zip(groups, opt.param_groups) for pid, p in zip(saved["params"], group["params"])
            for name, t in got["state"].get(pid, {}).items()
            # the moments have the parameter's shape and dtype; 'step' is a 0-d counter
            if isinstance(t, torch.Tensor) and t.ndim and (t.shape != p.shape or t.dtype != p.dtype)]


def check_resume(path, expect, args=None, fixed=()):
    """A training script's ckpt.pt -> its dict, checked against this run before anything is loaded, so that a
    truncated, foreign or other-config checkpoint fails with one message naming the file and every bad key.
    `expect` names every key the file must hold, no more and no fewer:
      a type (int for counters, dict for args): a value of that type;
      a state dict of this run (name -> tensor): the same names, shapes and dtypes;
      an optimizer of this run: as many parameters per group, each moment of its parameter's shape and dtype;
      anything else (the model config dict): an equal value, every differing field named.
    `fixed`: names in args (a dict) that must equal the saved run's (those that set the data position, such as the
    batch size): a resumed run that changed them would not continue the same sample stream."""
    ck = read_checkpoint(path)
    problems = [f"{'unexpected' if k in ck else 'missing'} key '{k}'" for k in sorted(set(ck) ^ set(expect), key=str)]
    for key, want in expect.items():
        if key in ck:
            problems += _value_problems(key, ck[key], want)
    saved = ck.get("args") if isinstance(ck.get("args"), dict) else {}
    problems += [f"--{name.replace('_', '-')} is {saved.get(name)!r} in the checkpoint but {args[name]!r} in this run"
                 for name in fixed if name in saved and saved[name] != args[name]]
    report(path, problems, " (resume with the flags the run was started with, or use a new --out)")
    return ck
