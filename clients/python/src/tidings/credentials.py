"""Connecting to a broker with TLS, mutual TLS and a bearer token: the
:class:`TLS` settings and the channel :class:`~tidings.Client` opens."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc

PEM = Union[bytes, str, "os.PathLike[str]"]
"""PEM data as ``bytes``, or the path of a PEM file (``str`` or a path)."""


def _read_pem(value: PEM | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {os.fspath(value)!r}: {e.strerror}") from None


@dataclass(frozen=True)
class TLS:
    """TLS settings of a :class:`~tidings.Client`.

    Each PEM value is either ``bytes`` (the PEM data itself) or a path to a
    PEM file (``str`` or a path object), read when the client is made.

    Attributes:
        ca: The CA bundle that signs the broker's certificate; ``None``
            trusts the default roots of grpcio.
        cert: The client's certificate chain, for a broker that asks for one
            (mutual TLS, ``tidings serve --tls-ca``); needs ``key``.
        key: The private key of ``cert``.
        server_name: The name to check the broker's certificate against,
            when it differs from the host of the target (e.g. connecting by
            IP address to a broker whose certificate names
            ``broker.internal``).
    """

    ca: PEM | None = None
    cert: PEM | None = None
    key: PEM | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The grpcio channel credentials.

        Raises:
            ValueError: ``cert`` without ``key`` or the other way round, or a
                file that cannot be read.
        """
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: cert and key go together (mutual TLS needs both)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "CA bundle"),
            private_key=_read_pem(self.key, "client key"),
            certificate_chain=_read_pem(self.cert, "client certificate"),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options (the server name override)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


class _BearerToken(grpc.AuthMetadataPlugin):
    """Sends ``authorization: Bearer <token>`` with every call of a secure
    channel (grpcio applies call credentials to streaming calls too)."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(self._metadata, None)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a plain-text
    channel, where grpcio refuses call credentials."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(self._header)
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        return continuation(self._details(details), requests)


def open_channel(target: str, tls: TLS | None, token: str | None) -> grpc.Channel:
    """Opens the channel of a client: plain text or TLS, with the token (if
    any) on every call, unary and streaming alike."""
    if tls is None:
        channel = grpc.insecure_channel(target)
        return with_token(channel, token)
    credentials = tls.credentials()
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(_BearerToken(token), name="tidings bearer token")
        )
    return grpc.secure_channel(target, credentials, options=tls.options())


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """``channel`` sending the bearer token with every call (unchanged
    without a token)."""
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerTokenInterceptor(token))
