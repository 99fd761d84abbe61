"""State-dict checkpoints: a user factory builds the network, the file supplies its weights (strictly).

--factory is "package.module:function" or "path/to/file.py:function"; the function is called with the keyword
arguments of --factory-args (a JSON object, none by default) and must return an nn.Module net(x_in, noise_in).
Weights come from a .safetensors file or a torch file read with weights_only=True; a dict holding the state dict
under a usual key is accepted too. A key mismatch that one prefix explains names the prefix to strip or add.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from memaudit.errors import UserError, first_lines
from memaudit.models.safe_pickle import safe_torch_load

# Keys under which training scripts commonly nest the state dict, in order of preference (EMA first).
STATE_DICT_KEYS = ("ema", "ema_state_dict", "state_dict", "model_state_dict", "model", "net")
# Factories the user named with --factory in this context: a native checkpoint may only run those.
_CONFIRMED: ContextVar[tuple[str, ...]] = ContextVar("memaudit_confirmed_factories", default=())


def is_safetensors(path: str | Path) -> bool:
    """True if the file starts like safetensors: an 8-byte little-endian header length, then '{'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        size = Path(path).stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def split_factory(spec: str) -> tuple[str, str, bool]:
    """(module or absolute file path, function name, is_file) of "pkg.mod:fn" or "file.py:fn"."""
    module_name, sep, func_name = (spec or "").rpartition(":")
    if not sep or not module_name or not func_name:
        raise UserError(f"bad --factory {spec!r}: expected 'package.module:function' or 'file.py:function'")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        return str(Path(module_name).expanduser().resolve()), func_name, True
    return module_name, func_name, False


def canonical_factory(spec: str) -> str:
    """The factory spec with a file path made absolute, as recorded in native checkpoints."""
    module_name, func_name, _ = split_factory(spec)
    return f"{module_name}:{func_name}"


def resolve_factory(spec: str) -> tuple[Callable[[], Any], str]:
    """Import the factory named by "pkg.mod:fn" or "file.py:fn"; return it and its canonical spec."""
    module_name, func_name, is_file = split_factory(spec)
    module = _import_file(Path(module_name)) if is_file else _import_module(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"bad --factory {spec!r}: {module_name} has no callable {func_name!r}")
    return func, f"{module_name}:{func_name}"


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # user code: any failure while importing is reported on one line
        raise UserError(f"cannot import factory module {name!r}: {type(exc).__name__}: {exc}") from None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"factory file not found: {path}")
    name = f"memaudit_factory_{abs(hash(str(path)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import factory file {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UserError(f"cannot import factory file {path}: {type(exc).__name__}: {exc}") from None
    return module


def build_network(factory: str, args: Optional[dict] = None) -> nn.Module:
    """Call the factory with the keyword arguments `args`; the module records {"name": "factory"} for native saving."""
    func, canonical = resolve_factory(factory)
    try:
        net = func(**(args or {}))
    except Exception as exc:
        raise UserError(f"--factory {factory} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"--factory {factory} returned {type(net).__name__}, not a torch.nn.Module")
    net.architecture = {"name": "factory", "kwargs": {"factory": canonical, **({"args": args} if args else {})}}
    return net


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a .safetensors file, or the state dict inside a torch file (weights only)."""
    path = Path(path)
    if is_safetensors(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    return extract_state_dict(safe_torch_load(path, trust_pickle=trust_pickle), path)


def extract_state_dict(obj: Any, source: str | Path) -> dict[str, Tensor]:
    """obj itself if it is a dict of tensors, else the first such dict under STATE_DICT_KEYS."""
    candidates = [obj] + [obj.get(k) for k in STATE_DICT_KEYS] if isinstance(obj, dict) else [obj]
    for state in candidates:
        if _is_tensor_dict(state):
            return _strip_prefix(dict(state), "module.")
    if isinstance(obj, nn.Module):
        raise UserError(f"{source} holds a whole pickled module, not a state dict; drop --factory to use it")
    raise UserError(f"{source} holds no state dict (a dict of tensors, possibly under one of "
                    f"{', '.join(STATE_DICT_KEYS)})")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove a prefix every key shares (nn.DataParallel saves 'module.'-prefixed keys)."""
    if all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_strict(net: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """net.load_state_dict(state, strict=True), with any mismatch summarised on one line."""
    problem = state_dict_mismatch(net.state_dict(), state)
    if problem:
        raise UserError(f"{source} does not match the network: {problem}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{source} does not match the network: {first_lines(exc, 2)}") from None


def state_dict_mismatch(expected: dict[str, Tensor], given: dict[str, Tensor]) -> str:
    """One line naming missing keys, unexpected keys and shape mismatches ('' if none)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    parts = [f"{label} {_few(items)}" for label, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if items]
    hint = prefix_hint(list(expected), list(given)) if missing and unexpected else ""
    return "; ".join(parts + ([hint] if hint else []))


def prefix_hint(expected: list[str], given: list[str]) -> str:
    """'the file's keys carry the prefix P: strip it' (or '... lack the prefix P: add it') when that makes every
    key the network expects appear in the file; '' when no single prefix does."""
    wanted = set(expected)
    for keys, other, verb in ((given, wanted, "strip"), (expected, set(given), "add")):
        parts = keys[0].split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            stripped = {k[len(prefix):] for k in keys if k.startswith(prefix)}
            if (verb == "strip" and stripped >= other) or (verb == "add" and stripped <= other and
                                                              len(stripped) == len(keys)):
                return (f"the file's keys carry the prefix {prefix!r} that the network's lack: strip it"
                        if verb == "strip" else
                        f"the network's keys carry the prefix {prefix!r} that the file's lack: add it (or have the "
                        f"factory return the inner module)")
    return ""


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_factory_network(path: str | Path, factory: str, *, trust_pickle: bool = False,
                         args: Optional[dict] = None) -> nn.Module:
    """Build the network with the factory (and its --factory-args) and load the file's state dict into it strictly."""
    state = read_state_dict(path, trust_pickle=trust_pickle)
    net = build_network(factory, args)
    load_strict(net, state, path)
    return net


@contextlib.contextmanager
def confirmed_factory(spec: Optional[str]) -> Iterator[None]:
    """Within this block, native checkpoints built by the factory `spec` (named by the user) may load."""
    token = _CONFIRMED.set(_CONFIRMED.get() + ((canonical_factory(spec),) if spec else ()))
    try:
        yield
    finally:
        _CONFIRMED.reset(token)


def network_from_native(kwargs: dict, folder: Path) -> nn.Module:
    """Native ARCHITECTURES builder for {"name": "factory", "kwargs": {"factory": spec}} (weights loaded after).

    The factory is Python code named by the checkpoint, so it runs only if the user confirmed it (--factory).
    """
    spec = kwargs.get("factory")
    if not isinstance(spec, str):
        raise UserError(f"{folder}: factory architecture lacks a 'factory' string: {json.dumps(kwargs)}")
    if spec not in _CONFIRMED.get():
        raise UserError(f"{folder} is built by the factory {spec!r}, which runs Python code: "
                        f"pass --factory {spec} to confirm you trust it")
    args = kwargs.get("args")
    if args is not None and not isinstance(args, dict):
        raise UserError(f"{folder}: factory architecture 'args' must be a JSON object: {json.dumps(args)}")
    return build_network(spec, args)
