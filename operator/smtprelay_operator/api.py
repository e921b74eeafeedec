"""Names of the SmtpRelay API and of what the operator stamps on the objects it owns."""

from __future__ import annotations

from typing import Final

GROUP: Final = "smtprelay.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "SmtpRelay"
PLURAL: Final = "smtprelays"
SINGULAR: Final = "smtprelay"
SHORT_NAMES: Final = ("smtpr",)
CATEGORIES: Final = ("smtprelay",)

FIELD_MANAGER: Final = "smtprelay-operator"
MANAGED_BY: Final = "smtprelay-operator"
NAME_LABEL: Final = "app.kubernetes.io/name"
INSTANCE_LABEL: Final = "app.kubernetes.io/instance"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
RESTART_HASH_ANNOTATION: Final = f"{GROUP}/restart-hash"
