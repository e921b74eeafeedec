"""policy: images from the installer's allow-list, Secrets only when labelled for the relay."""

from __future__ import annotations

from smtprelay_operator import policy

DEFAULT = "ghcr.io/smtprelay/smtprelay:1.2.0"


class TestImages:
    def test_default_allow_list_is_the_default_repository(self) -> None:
        """Any tag or digest of the default image's repository, nothing else."""
        allowed = policy.default_allowed_images(DEFAULT)
        assert allowed == ("ghcr.io/smtprelay/smtprelay:*", "ghcr.io/smtprelay/smtprelay@*")
        assert policy.image_refusal({"image": "ghcr.io/smtprelay/smtprelay:1.3.0"}, allowed) is None
        digest = "ghcr.io/smtprelay/smtprelay@sha256:" + "a" * 64
        assert policy.image_refusal({"image": digest}, allowed) is None

    def test_registry_port_is_not_taken_for_a_tag(self) -> None:
        """registry:5000/relay:1 → registry:5000/relay:* (the port stays)."""
        assert policy.default_allowed_images("registry:5000/relay:1")[0] == "registry:5000/relay:*"

    def test_other_image_is_refused_naming_the_field(self) -> None:
        """An image off the list (a look-alike repository too) is ImageNotAllowed, spec.image."""
        allowed = policy.default_allowed_images(DEFAULT)
        for image in ("docker.io/evil/printenv:1", "ghcr.io/smtprelay/smtprelay-evil:1"):
            refusal = policy.image_refusal({"image": image}, allowed)
            assert refusal is not None
            assert refusal.reason == "ImageNotAllowed"
            assert refusal.text().startswith("spec.image: ")

    def test_unset_image_is_the_operators_own(self) -> None:
        """No spec.image: the operator's default, always allowed."""
        assert policy.image_refusal({}, ()) is None

    def test_parse_list(self) -> None:
        """Commas or spaces separate patterns."""
        assert policy.parse_allowed_images("a:*, b@*  c:1") == ("a:*", "b@*", "c:1")


class TestSecrets:
    def test_every_reference_is_found(self) -> None:
        """TLS, AUTH, the gateway's and each route's credentials and CA, with their field."""
        spec = {
            "tls": {"secretName": "cert"},
            "auth": {"secretName": "users"},
            "gateway": {"host": "gw", "credentialsSecret": "login", "caSecret": "ca"},
            "routes": [{"domains": ["a"], "credentialsSecret": "r0", "caSecret": "r0-ca"}],
        }
        assert policy.secret_references(spec) == [
            ("spec.tls.secretName", "cert"),
            ("spec.auth.secretName", "users"),
            ("spec.gateway.credentialsSecret", "login"),
            ("spec.gateway.caSecret", "ca"),
            ("spec.routes[0].credentialsSecret", "r0"),
            ("spec.routes[0].caSecret", "r0-ca"),
        ]

    def test_labelled_secret_is_allowed(self) -> None:
        """smtprelay.dev/use: "true" is the owner's consent."""
        labels = {"smtprelay.dev/use": "true"}
        assert policy.secret_refusal("spec.tls.secretName", "cert", labels) is None

    def test_unlabelled_secret_is_refused(self) -> None:
        """Any other Secret is SecretNotAllowed, naming the field and the label to add."""
        refusal = policy.secret_refusal("spec.gateway.credentialsSecret", "db", {"app": "db"})
        assert refusal is not None
        assert refusal.reason == "SecretNotAllowed"
        assert refusal.text().startswith("spec.gateway.credentialsSecret: Secret 'db'")
        assert "smtprelay.dev/use" in refusal.message

    def test_missing_secret_is_not_found(self) -> None:
        """A Secret that does not exist (yet) is SecretNotFound."""
        refusal = policy.secret_refusal("spec.tls.secretName", "cert", None)
        assert refusal is not None
        assert refusal.reason == "SecretNotFound"
