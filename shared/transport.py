"""The only module that talks to pika directly for blocking connections.

pika's exceptions are translated into `vespid.shared.errors` here and never leak further.
Connecting and reconnecting are retried with tenacity (exponential backoff, logged).
"""

from __future__ import annotations

import itertools
import ssl
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias, TypeVar
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
    retry_if_exception,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    stop_any,
    wait_exponential,
)
from tenacity.stop import stop_base

from vespid.shared.errors import (
    BrokerError,
    BrokerRefused,
    BrokerUnavailable,
    ConfigError,
    NobodyAnswers,
    PublishFailed,
    VespidError,
)
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


def broker_urls(url: str) -> list[str]:
    """The broker addresses a URL setting names: one, or several nodes of one RabbitMQ
    cluster separated by commas (`amqp://u:p@rabbit1/farm,amqp://u:p@rabbit2/farm`)."""
    return [part.strip() for part in url.split(",") if part.strip()] or [url]


def redact(url: str) -> str:
    """The URL (or URLs) with the password replaced, for logs and printed settings."""
    return ",".join(_redact_one(one) for one in broker_urls(url))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def user_of(url: str) -> str | None:
    """The user a URL logs in as: what RabbitMQ accepts as `user_id` from that connection
    (every address of a cluster logs in as the same user)."""
    from urllib.parse import unquote

    username = urlsplit(broker_urls(url)[0]).username
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
    try:
        params = pika.URLParameters(url)
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{_shown(url)!r} is not an AMQP URL ({exc or type(exc).__name__}): write it as "
            "amqp://user:password@host:5672/vhost (amqps:// for TLS) in VESPID_AMQP_URL or "
            "--amqp-url") from None
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.client_properties = {"connection_name": name, "product": "vespid"}
    if url.startswith("amqps://"):
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
        params.ssl_options = pika.SSLOptions(context, params.host)
    return params


def broker_addresses(url: str, **options: Any) -> list[pika.URLParameters]:
    """Connection parameters for every address `url` names, in order (options as for
    connection_parameters)."""
    return [connection_parameters(one, **options) for one in broker_urls(url)]


def _shown(url: str) -> str:
    try:
        return redact(url)
    except ValueError:
        return "<an unreadable URL>"


def reason(exc: BaseException) -> str:
    """A readable cause: pika's connection errors often have empty text and the real one
    (`ConnectionRefusedError(111, ...)`) inside their arguments."""
    return str(exc) or "; ".join(str(a) or repr(a) for a in exc.args) or type(exc).__name__


def retry_logger(logger: Any, event: str, once: bool = False) -> Callable[[RetryCallState], None]:
    """A tenacity `before_sleep` that logs each retry as one event with its error (with
    `once`, only the first: a command someone waits for says it once, not ten times)."""

    def log_retry(state: RetryCallState) -> None:
        if once and state.attempt_number > 1:
            return
        error = state.outcome.exception() if state.outcome else None
        logger.warning(event, attempt=state.attempt_number,
                       error=reason(error) if error else None)

    return log_retry


def permanent(exc: BaseException, params: pika.URLParameters) -> VespidError | None:
    """The error to end with when retrying cannot help (kombu's "irrecoverable"): the broker
    answered and said no. None for a transient error (refused, reset, timed out, shut down)."""
    where = f"RabbitMQ at {params.host}:{params.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return BrokerRefused(
            f"the broker's TLS certificate at {params.host}:{params.port} does not verify "
            f"({exc.verify_message}); set VESPID_TLS_CA_FILE to the CA that signed it")
    code = _close_code(exc)
    login_refused = (pika.exceptions.ProbableAuthenticationError,
                     pika.exceptions.AuthenticationError)
    if isinstance(exc, login_refused) or code == 403:
        return ConfigError(
            f"{where} refused the login of user {params.credentials.username!r} "
            "(ACCESS_REFUSED): the user or password in VESPID_AMQP_URL is wrong")
    denied = isinstance(exc, pika.exceptions.ProbableAccessDeniedError) or code == 530
    # "vhost x is down" (its process crashed, or a cluster node is still starting it) can
    # come back by itself; a vhost that does not exist, or no permission on it, cannot.
    if denied and "is down" not in reason(exc):
        return ConfigError(
            f"{where} has no vhost {params.virtual_host!r} that user "
            f"{params.credentials.username!r} may use ({reason(exc)}): create it "
            "(`vespid broker setup --vhost NAME`, or `rabbitmqctl add_vhost NAME` and "
            "`set_permissions`) or fix the vhost in VESPID_AMQP_URL")
    return None


def _close_code(exc: BaseException) -> int | None:
    for error in (exc, *exc.args):
        if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
            return int(error.reply_code)
    return None


class _StopWhen(stop_base):
    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


Brokers: TypeAlias = pika.URLParameters | Sequence[pika.URLParameters]


def connect(brokers: Brokers, *, give_up_after: float = 60.0,
            quiet: bool = False, stop_when: Callable[[], bool] = lambda: False) -> Any:
    """A BlockingConnection, retried with backoff for up to `give_up_after` seconds while
    the error is transient; a permanent one (wrong password, no such vhost, a certificate
    that does not verify) ends it at once with a sentence. Several addresses (the nodes of
    a cluster) are tried in turn, one an attempt, so a process moves to a node still up
    when its own goes. `quiet`: say the retrying once; `stop_when`: give up early (a
    process asked to stop while the broker is away)."""
    candidates = rotation(brokers)
    tried: list[pika.URLParameters] = []

    @retry(
        retry=retry_if_exception(lambda e: isinstance(e, CONNECTION_ERRORS)
                                 and permanent(e, tried[-1]) is None),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_any(stop_after_delay(give_up_after), _StopWhen(stop_when)),
        before_sleep=retry_logger(log, "broker_unreachable_retrying", once=quiet),
        reraise=True,
    )
    def attempt() -> Any:
        tried.append(next(candidates))
        return pika.BlockingConnection(tried[-1])

    started = time.monotonic()
    try:
        return attempt()
    except CONNECTION_ERRORS as exc:
        final = permanent(exc, tried[-1])
        if final is not None:
            raise final from None
        where = ", ".join(sorted({f"{p.host}:{p.port}" for p in tried}))
        raise BrokerUnavailable(
            f"no RabbitMQ broker answers at {where} ({reason(exc)}; "
            f"tried for {time.monotonic() - started:.0f} s). Start one with "
            "`rabbitmq-server -detached` or "
            "`docker compose up rabbitmq`, or point VESPID_AMQP_URL at yours."
        ) from None


def rotation(brokers: Brokers) -> Iterator[pika.URLParameters]:
    """The addresses to try, one after the other, for ever."""
    return itertools.cycle([brokers] if isinstance(brokers, pika.URLParameters)
                           else list(brokers))


def refused(exc: BaseException, doing: str) -> VespidError:
    """What a channel error means, as the error to raise: the broker refusing on purpose
    (403, 406) is a setting to fix, never worth retrying; anything else is a lost link."""
    refused_by = refusal(exc)
    if refused_by is None:
        return BrokerError(f"lost the broker while {doing}: {reason(exc)}")
    code, text = refused_by
    if code == 406:
        return ConfigError(
            f"{doing}: the broker refused ({text}). It exists with other arguments than this "
            "version declares (an older Vespid or another program made it): delete it "
            "(`rabbitmqctl delete_queue NAME -p VHOST`) or use a vhost of its own")
    if code == 403:
        return ConfigError(f"{doing}: the broker refused ({text}): this user lacks the "
                           "permission; `vespid broker setup` grants what each role needs")
    return BrokerError(f"{doing}: the broker refused ({text})")


def declared(action: Callable[[], T], doing: str) -> T:
    """Run a declaration; a refusal ends the process with a sentence, a lost link retries."""
    try:
        return action()
    except CONNECTION_ERRORS as exc:
        raise refused(exc, doing) from None


def require_consumer(connection: Any, queue: str, who: str, fix: str,
                     error: type[NobodyAnswers] = NobodyAnswers) -> None:
    """Fail at once, saying what to do, when nothing consumes the queue that would answer."""
    found = consumers(connection, queue)
    if found is None:
        raise error(f"no {who} has run on this vhost ({queue} does not exist): {fix}")
    if found[0] == 0:
        raise error(f"no {who} consumes {queue} on this vhost ({found[1]} messages wait "
                    f"there): {fix}")


def consumers(connection: Any, queue: str) -> tuple[int, int] | None:
    """(consumers, messages) of a queue, or None when it does not exist: how a client tells
    "nobody will answer" before waiting. A channel of its own, since a passive declare of a
    missing queue closes it."""
    probe = guarded(connection.channel)
    try:
        found = probe.queue_declare(queue, passive=True).method
    except CONNECTION_ERRORS as exc:
        refused_by = refusal(exc)
        if refused_by is not None and refused_by[0] == 404:
            return None
        raise refused(exc, f"asking about {queue}") from None
    finally:
        if probe.is_open:
            guarded(probe.close)
    return int(found.consumer_count), int(found.message_count)


def wake(connection: Any) -> None:
    """Make a BlockingConnection's process_data_events return now, from any thread (the
    one thread-safe call pika has); a connection that is closed or gone is left alone."""
    if connection is None:
        return
    try:
        connection.add_callback_threadsafe(_nothing)
    except (pika.exceptions.ConnectionWrongStateError, *CONNECTION_ERRORS):
        pass  # closed: whoever waits on it wakes up anyway


def _nothing() -> None:
    """A callback whose only effect is to be dispatched."""


def keep_reconnecting(session: Callable[[], None], logger: Any) -> None:
    """Run a broker session again, with backoff, every time the broker goes away; return
    once a session ends on its own. The one reconnect loop of every long-running process."""
    for attempt in Retrying(retry=retry_if_exception_type(BrokerError)
                            & retry_if_not_exception_type(BrokerRefused),
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
    message_id: str | None = None,
) -> pika.BasicProperties:
    """Every message carries type, app_id, message_id and timestamp, so the UI reads well,
    and the sender's login as user_id where it is known (the broker checks it)."""
    return pika.BasicProperties(
        user_id=user_id,
        content_type=JSON,
        delivery_mode=2 if persistent else 1,
        type=command,
        app_id=app_id,
        message_id=message_id or uuid.uuid4().hex,
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
