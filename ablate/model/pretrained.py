"""Trunk weights by torchvision name (`model.weights=IMAGENET1K_V1`), through torchvision's weights API.

The file goes where torchvision keeps it, torch.hub's cache (`$TORCH_HOME/hub/checkpoints/`, by
default ~/.cache/torch/hub/checkpoints/), under the name of its URL, so a file copied there from a
connected machine is used as is. A download that cannot happen is one `ConfigError` line naming the
URL, where the file would go, and the `model.weights=PATH` alternative.
"""

from __future__ import annotations

import http.client
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torchvision.models import WeightsEnum

from ablate.errors import ConfigError

# "IMAGENET1K_V1", "DEFAULT", or the full "ResNet50_Weights.IMAGENET1K_V1": anything else is a path.
_NAME = re.compile(r"^(?:[A-Za-z0-9]+_Weights\.)?[A-Z][A-Z0-9_]*$")

# An unreachable host must not hang the run: torch.hub opens the URL without a timeout.
DOWNLOAD_TIMEOUT_S = 30.0


def is_weights_name(value: str) -> bool:
    """True for a torchvision weights name, False for what must be a path to a state dict."""
    return bool(_NAME.match(value))


def resolve(trunk: str, name: str) -> WeightsEnum:
    """The torchvision weights `name` of the trunk `trunk` (e.g. resnet50, IMAGENET1K_V1)."""
    try:
        enum = torchvision.models.get_model_weights(trunk)
    except ValueError:
        raise ConfigError(f"model.weights: '{name}' names torchvision weights, which model.trunk={trunk} "
                          "has none of (use a ResNet trunk, or a path to a state dict)") from None
    enum_name, _, member = name.rpartition(".")
    if enum_name and enum_name != enum.__name__:
        raise ConfigError(f"model.weights: '{name}' are not weights of model.trunk={trunk} ({enum.__name__})")
    if member not in enum.__members__:
        known = ", ".join(enum.__members__)
        raise ConfigError(f"model.weights: '{member}' is no weights name of {trunk} (known: {known})")
    return enum[member]


def cached_file(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (or will keep) the file of `weights`: the hub dir's checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def fetch(trunk: str, name: str) -> Path:
    """The cached file of the weights `name` of `trunk`, downloaded first if it is not there yet
    (torch.hub says so on stderr)."""
    weights = resolve(trunk, name)
    path = cached_file(weights)
    if path.is_file():
        return path
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except (OSError, http.client.HTTPException) as e:
        reason = str(getattr(e, "reason", "") or e or type(e).__name__).splitlines()[0][:100]
        raise ConfigError(f"model.weights: cannot download {weights!r} from {weights.url} ({reason}); without "
                          f"network, download it on a connected machine and copy it into {path.parent}/, or set "
                          "model.weights=PATH to a local state dict") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return path


def state_dict(trunk: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict of the weights `name` of `trunk`, read from torch.hub's cache (downloaded if
    missing) by torchvision's `WeightsEnum.get_state_dict`."""
    path = fetch(trunk, name)
    try:
        return resolve(trunk, name).get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated copy in the cache: say which file to replace
        raise ConfigError(f"model.weights: cannot load the cached '{path}' ({type(e).__name__}); "
                          "delete it to download it again, or copy a good one there") from None
