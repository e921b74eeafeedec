"""What an SmtpRelay may ask of the operator: which images, which Secrets.

Whoever may create an SmtpRelay must not thereby be able to read the namespace's Secrets.
Without these checks they could: name any Secret (it is mounted into the relay pod) and set
``spec.image`` to a program that prints it, or point the gateway at their own host with the
Secret as its credentials. So the image must be on the installer's allow-list, and a
Secret is used only when its owner labelled it for the relay. Pure: the reconciler reads
the Secret labels (metadata only) and asks here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

USE_LABEL = "smtprelay.dev/use"
USE_VALUE = "true"


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a spec cannot be run as it is; ``field`` names the spec field."""

    reason: str
    field: str
    message: str

    def text(self) -> str:
        return f"{self.field}: {self.message}"


def default_allowed_images(default_image: str) -> tuple[str, ...]:
    """The default image's repository, any tag or digest."""
    repository = default_image.split("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:
        repository = repository[: repository.rfind(":")]
    return (f"{repository}:*", f"{repository}@*")


def parse_allowed_images(text: str) -> tuple[str, ...]:
    """A comma- or whitespace-separated list of image patterns (``*`` is a wildcard)."""
    return tuple(item for item in text.replace(",", " ").split() if item)


def image_refusal(spec: Mapping[str, Any], allowed: Sequence[str]) -> Refusal | None:
    image = spec.get("image")
    if image is None:
        return None  # the operator's own default
    if any(fnmatch.fnmatchcase(str(image), pattern) for pattern in allowed):
        return None
    return Refusal(
        "ImageNotAllowed",
        "spec.image",
        f"{image!r} is not among the images the operator's installer allows "
        f"({', '.join(allowed)}); the relay pod is not created",
    )


def secret_references(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(spec field, Secret name) for every Secret the spec names."""
    gateway = spec.get("gateway") or {}
    found = [
        ("spec.tls.secretName", (spec.get("tls") or {}).get("secretName")),
        ("spec.auth.secretName", (spec.get("auth") or {}).get("secretName")),
        ("spec.gateway.credentialsSecret", gateway.get("credentialsSecret")),
        ("spec.gateway.caSecret", gateway.get("caSecret")),
    ]
    for index, route in enumerate(spec.get("routes") or []):
        for key in ("credentialsSecret", "caSecret"):
            found.append((f"spec.routes[{index}].{key}", (route or {}).get(key)))
    return [(field, str(name)) for field, name in found if name]


def secret_refusal(field: str, name: str, labels: Mapping[str, str] | None) -> Refusal | None:
    """None when Secret ``name`` (its labels, or None when it does not exist) may be used."""
    if labels is None:
        return Refusal("SecretNotFound", field, f"Secret {name!r} does not exist")
    if labels.get(USE_LABEL) == USE_VALUE:
        return None
    return Refusal(
        "SecretNotAllowed",
        field,
        f"Secret {name!r} is not labelled {USE_LABEL}={USE_VALUE!r}; its owner must label "
        "it for the relay before the relay may use it (the relay pod is not created)",
    )
