"""Reading DeepSpeed's checkpoint pickles without DeepSpeed, and without running their code.

DeepSpeed pickles whole objects into its files (its LossScaler, ZeroStageEnum, the
fragment_address tuples of param_slice_mappings), so ``weights_only=True`` refuses them and
a plain ``torch.load`` needs deepspeed importable, and would run whatever a file names. Here
every global a file names that torch's weights-only loader does not allow (deepspeed's
classes, a user's object in the client state, anything else) becomes a stub class that only
records what the pickle gives it (constructor arguments, state): nothing a file names runs.
The stubs keep their original module and name, so a stub that reaches zerofx's checkpoint
(a client-state entry) is refused by that name.
"""
from __future__ import annotations

import _compat_pickle
import functools
import pickle
import types
from pathlib import Path

import torch

from zerofx.checkpoint.schema import CheckpointError


class DeepSpeedObject:
    """An object read from a pickle as a stub (a DeepSpeed one, or any the weights-only
    loader would refuse): ``ds_class`` names its class, ``args`` holds what it was
    constructed with (enums, named tuples), attributes hold its saved state."""

    ds_class = "deepspeed"

    def __new__(cls, *args, **kwargs):
        # __new__, not __init__: protocol 2 rebuilds named tuples by cls.__new__(cls, *args)
        obj = super().__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        return obj

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    @property
    def value(self):
        """An enum's value (ZeroStageEnum(2).value == 2)."""
        return self.args[0] if self.args else None

    def __repr__(self) -> str:
        return f"<{self.ds_class}{self.args or ''}>"


_STUBS: dict[str, type] = {}


def _stub(qualified: str) -> type:
    if qualified not in _STUBS:
        # an enum is pickled as (cls, (value,)), and one class per name keeps them apart
        module, name = qualified.rsplit(".", 1)
        _STUBS[qualified] = type(name, (DeepSpeedObject,),
                                 {"ds_class": qualified, "__module__": module})
    return _STUBS[qualified]


@functools.cache
def _allowed() -> dict:
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # protocol 2 (torch.save's) writes Python 2 names (__builtin__.set); map them back
        # as pickle's own find_class does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        return _allowed().get(qualified) or _stub(qualified)


# torch.load(pickle_module=...) subclasses ``Unpickler`` and calls ``load`` on old formats
_PICKLE = types.ModuleType("zerofx_deepspeed_pickle")
_PICKLE.Unpickler = _Unpickler
_PICKLE.load = lambda f, **kw: _Unpickler(f, **kw).load()
_PICKLE.__dict__["UnpicklingError"] = pickle.UnpicklingError


def load_deepspeed_file(path: Path) -> dict:
    """One DeepSpeed checkpoint file as a dict; deepspeed objects in it become stubs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; copy the whole DeepSpeed tag directory")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except Exception as e:  # noqa: BLE001 - truncated zip, forbidden global, bad pickle...
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path} cannot be read as a DeepSpeed checkpoint file "
                              f"({type(e).__name__}: {first}); check that it is one and "
                              f"that the copy is complete") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not the dict DeepSpeed's "
                              f"save_checkpoint writes; is this a DeepSpeed checkpoint?")
    return obj


def is_deepspeed_object(obj, class_name: str) -> bool:
    return isinstance(obj, DeepSpeedObject) and obj.ds_class.rsplit(".", 1)[-1] == class_name
