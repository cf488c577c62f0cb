"""The only module that talks to pika directly for blocking connections.

pika's exceptions are translated into `vespid.shared.errors` here and never leak further.
Connecting and reconnecting are retried with tenacity (exponential backoff, logged).
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorException,
)
from tenacity import (
    RetryCallState,
    Retrying,
    retry,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)

from vespid.shared.errors import BrokerError, BrokerUnavailable, PublishFailed
from vespid.shared.logs import get_logger

log = get_logger(__name__)

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
JSON = "application/json"
T = TypeVar("T")

# Errors that mean "the broker or the link is gone": reconnecting can help.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.ChannelClosed,
    # A handshake that times out (an overloaded broker) surfaces as these, not as
    # AMQPConnectionError.
    AMQPConnectorException,
    AMQPConnectionWorkflowFailed,
    ConnectionError,
    OSError,
)


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and printed settings."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def user_of(url: str) -> str | None:
    """The user a URL logs in as: what RabbitMQ accepts as `user_id` from that connection."""
    from urllib.parse import unquote

    username = urlsplit(url).username
    return unquote(username) if username else None


def connection_parameters(
    url: str,
    *,
    name: str,
    heartbeat: int = 30,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.client_properties = {"connection_name": name, "product": "vespid"}
    if url.startswith("amqps://"):
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
        params.ssl_options = pika.SSLOptions(context, params.host)
    return params


def retry_logger(logger: Any, event: str) -> Callable[[RetryCallState], None]:
    """A tenacity `before_sleep` that logs each retry as one event with its error."""

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(event, attempt=state.attempt_number,
                       error=str(error) or type(error).__name__)

    return log_retry


def connect(params: pika.URLParameters, *, give_up_after: float = 60.0) -> Any:
    """A BlockingConnection, retried with backoff for up to `give_up_after` seconds."""

    @retry(
        # A certificate that does not verify will not verify on the next try either.
        retry=retry_if_exception_type(CONNECTION_ERRORS)
        & retry_if_not_exception_type(ssl.SSLCertVerificationError),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(give_up_after),
        before_sleep=retry_logger(log, "broker_unreachable_retrying"),
        reraise=True,
    )
    def attempt() -> Any:
        return pika.BlockingConnection(params)

    try:
        return attempt()
    except ssl.SSLCertVerificationError as exc:
        raise BrokerUnavailable(
            f"the broker's TLS certificate at {params.host}:{params.port} does not verify "
            f"({exc.verify_message}); set VESPID_TLS_CA_FILE to the CA that signed it"
        ) from None
    except pika.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnavailable(
            f"RabbitMQ at {params.host}:{params.port} refused the credentials ({exc})"
        ) from None
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(
            f"no RabbitMQ broker answers at {params.host}:{params.port} "
            f"(vhost {params.virtual_host!r}): {exc or type(exc).__name__}. Start one with "
            "`rabbitmq-server -detached` or `docker compose up rabbitmq`, or point "
            "VESPID_AMQP_URL at yours."
        ) from None


def keep_reconnecting(session: Callable[[], None], logger: Any) -> None:
    """Run a broker session again, with backoff, every time the broker goes away; return
    once a session ends on its own. The one reconnect loop of every long-running process."""
    for attempt in Retrying(retry=retry_if_exception_type(BrokerError),
                            wait=wait_exponential(multiplier=0.2, max=5),
                            before_sleep=retry_logger(logger, "broker_lost_reconnecting")):
        with attempt:
            session()


def properties(
    command: str,
    *,
    app_id: str,
    persistent: bool = True,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    headers: dict[str, Any] | None = None,
    user_id: str | None = None,
) -> pika.BasicProperties:
    """Every message carries type, app_id, message_id and timestamp, so the UI reads well,
    and the sender's login as user_id where it is known (the broker checks it)."""
    return pika.BasicProperties(
        user_id=user_id,
        content_type=JSON,
        delivery_mode=2 if persistent else 1,
        type=command,
        app_id=app_id,
        message_id=uuid.uuid4().hex,
        timestamp=int(time.time()),
        reply_to=reply_to,
        correlation_id=correlation_id,
        headers=headers,
    )


def publish_confirmed(
    channel: Any,
    exchange: str,
    routing_key: str,
    body: bytes,
    props: pika.BasicProperties,
    *,
    mandatory: bool = True,
) -> None:
    """Publish on a channel in confirm mode; raise PublishFailed when not stored or routed."""
    try:
        channel.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
    except pika.exceptions.UnroutableError:
        raise PublishFailed(f"no queue is bound to {exchange!r} with key {routing_key!r}") \
            from None
    except pika.exceptions.NackError:
        raise PublishFailed(f"the broker refused the message to {routing_key!r}") from None
    except CONNECTION_ERRORS as exc:
        raise BrokerError(f"lost the broker while publishing: {exc!r}") from None


def guarded(action: Callable[[], T]) -> T:
    """Run a pika call; turn a lost connection or channel into BrokerError."""
    try:
        return action()
    except CONNECTION_ERRORS as exc:
        raise BrokerError(f"lost the broker: {exc!r}") from None


def refusal(exc: BaseException) -> tuple[int, str] | None:
    """(reply code, text) when the broker closed a channel on purpose (403 access refused,
    404 no such exchange or queue, 406 precondition failed); None for a lost link."""
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return exc.reply_code, str(exc.reply_text)
    return None


def close_quietly(connection: Any) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except Exception:  # noqa: BLE001 - closing a dead link is best effort by nature
        pass
