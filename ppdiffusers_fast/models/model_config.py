"""Models whose constructor arguments are their config (a diffusers ``config.json``), with no ppdiffusers import.

The FLUX transformer needs only three things of ppdiffusers' ``ModelMixin`` / ``ConfigMixin``: ``model.config``
(the constructor's arguments, defaults filled in, read-only), ``Model.from_config(dict)`` (a folder's
``config.json`` may carry keys of other diffusers versions) and an output record that is read by field or by index.
Importing ppdiffusers for them also imports paddlenlp (about 230 MB of resident memory and several seconds per
process), which a training step on cached latents, a LoRA export or the predictor never uses otherwise.
"""
import functools
import inspect
import logging
from dataclasses import fields
from typing import Any, Mapping

__all__ = ["FrozenConfig", "register_to_config", "ConfigMixin", "ModelOutput"]

logger = logging.getLogger(__name__)


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (``config.in_channels``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the config has no field {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a model's config is read-only: build a new model from an edited dict instead")

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _refuse


def register_to_config(init):
    """Decorate ``__init__`` so that the model keeps its arguments (defaults included) as ``self.config``."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {name: value for name, value in bound.arguments.items() if name != "self"}
        init(self, *args, **kwargs)
        object.__setattr__(self, "config", FrozenConfig(values))

    return wrapped


class ConfigMixin:
    """``from_config`` for a class whose ``__init__`` is wrapped by :func:`register_to_config`."""

    config_name = "config.json"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides):
        """Build from ``config`` (e.g. a parsed ``config.json``) with ``overrides`` on top.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are bookkeeping and
        dropped; any other key the constructor does not take is dropped with a warning naming it, as diffusers
        does for configs of other versions.
        """
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        values = {**dict(config), **overrides}
        unknown = sorted(k for k in values if k not in accepted and not k.startswith("_"))
        if unknown:
            logger.warning("%s ignores config keys it does not take: %s", cls.__name__, ", ".join(unknown))
        return cls(**{k: v for k, v in values.items() if k in accepted})


class ModelOutput:
    """Base of a model's output dataclass: fields by name (``out.sample``) or, set fields only, by position
    (``out[0]``) as ``return_dict=False`` tuples are read."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, index):
        return self.to_tuple()[index]
