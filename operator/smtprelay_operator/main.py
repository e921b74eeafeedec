"""`smtprelay-operator`: run the kopf operator for SmtpRelay resources.

One replica, standalone (no kopf peering objects to create or clean up); cluster-wide by
default, or limited to the namespaces given with `--namespace`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
from collections.abc import Sequence

import kopf

from smtprelay_operator import handlers, policy, relayconfig, render

IMAGE_ENV = "SMTPRELAY_RELAY_IMAGE"
ALLOWED_IMAGES_ENV = "SMTPRELAY_ALLOWED_IMAGES"
CONFIG_URL_ENV = "SMTPRELAY_RELAY_CONFIG_URL"
IMAGE_REPOSITORY = "ghcr.io/smtprelay/smtprelay"
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
# kopf's own log formats, by the names its CLI uses; "full" is kopf's default.
LOG_FORMATS = {
    "plain": kopf.LogFormat.PLAIN,
    "full": kopf.LogFormat.FULL,
    "json": kopf.LogFormat.JSON,
}
DEFAULT_LOG_FORMAT = "full"
KOPF_OBJECTS_LOGGER = "kopf.objects"


def default_image() -> str:
    """$SMTPRELAY_RELAY_IMAGE, else the relay image of this very release."""
    return os.environ.get(IMAGE_ENV) or (
        f"{IMAGE_REPOSITORY}:{importlib.metadata.version('smtprelay')}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smtprelay-operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument(
        "--relay-image",
        default=None,
        help=f"relay image for SmtpRelays that set no spec.image (default: ${IMAGE_ENV} or "
        f"{IMAGE_REPOSITORY}:<version>)",
    )
    parser.add_argument(
        "--allowed-images",
        default=None,
        help="image patterns (comma-separated, * a wildcard) an SmtpRelay's spec.image may "
        f"name (default: ${ALLOWED_IMAGES_ENV}, else the default relay image's repository "
        "with any tag or digest)",
    )
    parser.add_argument(
        "--relay-config-url",
        default=None,
        help="where to ask each relay which relay.yaml it runs ({name} and {namespace} are "
        f"filled in); Ready waits for it to run the new one. Default: ${CONFIG_URL_ENV}, else "
        f"{relayconfig.DEFAULT_URL}; empty: do not ask (Ready follows the pod alone)",
    )
    parser.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve the operator's own Prometheus /metrics here (e.g. 0.0.0.0:8081); default: off",
    )
    parser.add_argument(
        "--liveness",
        default=DEFAULT_LIVENESS,
        help=f"kopf's liveness endpoint (default: {DEFAULT_LIVENESS})",
    )
    parser.add_argument(
        "--log-format",
        choices=sorted(LOG_FORMATS),
        default=DEFAULT_LOG_FORMAT,
        help="plain (the message only), full (time, logger, level, message) or json "
        f"(one JSON object a line, for log collectors); default: {DEFAULT_LOG_FORMAT}",
    )
    parser.add_argument(
        "--resync-interval",
        type=float,
        default=handlers.DEFAULT_RESYNC,
        metavar="SECONDS",
        help="re-check every SmtpRelay this often even without a watch event "
        f"(default: {handlers.DEFAULT_RESYNC:.0f})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=handlers.DEFAULT_WORKERS,
        help=f"SmtpRelays reconciled at once (default: {handlers.DEFAULT_WORKERS})",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log kopf's progress")
    parser.add_argument("--debug", action="store_true", help="log everything kopf does")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    kopf.configure(verbose=args.verbose, debug=args.debug, log_format=LOG_FORMATS[args.log_format])
    # kopf logs "Handler ... succeeded" at INFO for every watch event: two lines an event,
    # thousands a minute with many SmtpRelays. Unless asked for, only its warnings and errors.
    quiet = not (args.verbose or args.debug)
    logging.getLogger(KOPF_OBJECTS_LOGGER).setLevel(logging.WARNING if quiet else logging.NOTSET)
    memo = kopf.Memo(
        defaults=render.OperatorDefaults(
            relay_image=args.relay_image or default_image(),
            allowed_images=policy.parse_allowed_images(
                args.allowed_images or os.environ.get(ALLOWED_IMAGES_ENV, "")
            ),
        ),
        namespaced=bool(args.namespace),
        resync=args.resync_interval,
        config_url=args.relay_config_url
        if args.relay_config_url is not None
        else os.environ.get(CONFIG_URL_ENV, relayconfig.DEFAULT_URL),
        workers=max(1, args.workers),
        metrics_listen=args.metrics_listen,
    )
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
        memo=memo,
    )


if __name__ == "__main__":
    main()
