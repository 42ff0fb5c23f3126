"""The ``kafka`` backend: topics, producers and consumer groups on Apache Kafka, via aiokafka.

- Topics are created through the admin client with the pipeline's partition counts
  (``cleanup.policy=compact`` for compacted topics) and ``KafkaSettings.replication_factor``
  replicas, by default one per broker up to 3; a topic that exists with another partition
  count is refused with a message that says so.
- Producers are idempotent with ``acks=all`` and append whole batches through aiokafka's batch
  API (closed ``BatchBuilder``s: about ten times cheaper per record than ``send()``, and sent
  without lingering). A send only queues its batch; a task per partition hands the queue to
  aiokafka in the background, so the worker does not wait for the broker between polls
  (:mod:`pipelines.log._kafka_sends`). :meth:`KafkaProducer.flush` and a transaction's commit
  wait until everything queued is handed over and acknowledged.
- Consumers use manual commits, ``read_committed`` isolation and Kafka's range assignor, so the
  same partition number of co-partitioned topics lands on the same member (aiokafka implements
  only the eager rebalance protocol). Rebalance callbacks come from aiokafka's coordinator task;
  the worker serialises them with its loop (see :mod:`pipelines.runtime.worker`).
- Fetched records become columnar batches straight from aiokafka's record batches, with no
  ``ConsumerRecord`` per record (:mod:`pipelines.log._kafka_records`), in the consumers and in
  :meth:`KafkaLog.read` alike.

Connection problems surface as :class:`~pipelines.errors.LogError` within
``KafkaSettings.connect_timeout`` seconds, naming the bootstrap servers, never a secret. When
the cluster cannot be reached, one more connection to a bootstrap server finds out why (aiokafka
only says it could not bootstrap), so that a refused password, an untrusted broker certificate,
a missing or refused client certificate or a TLS/plaintext mix-up each get their own message;
the broker denying an operation by its ACLs names the principal and what to grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    ProducerFenced,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.structs import OffsetAndMetadata

from pipelines.errors import FencedError, LogError, TopicError
from pipelines.log._kafka_records import ColumnReader
from pipelines.log._kafka_sends import Sends
from pipelines.log.base import (
    Consumer,
    FetchedBatch,
    LogBackend,
    Producer,
    RawBatch,
    RebalanceListener,
    TopicPartition,
    TopicSpec,
    TransactionalProducer,
)
from pipelines.settings import KafkaSettings

__all__ = ["KafkaConsumer", "KafkaLog", "KafkaProducer"]

T = TypeVar("T")
_READ_POLL = 0.2
"""Seconds :meth:`KafkaLog.read` waits for records before it looks at the position."""
_TOPIC_CONFIG = 1  # DescribeConfigs config_source: set on the topic itself
_RETRY_BACKOFF = 0.25
"""Seconds between two tries of an admin request that failed with a retriable error."""
_DEFAULT_REPLICAS = 3
"""Replicas of a topic Headwater creates, unless the settings say otherwise (fewer when the
cluster has fewer brokers)."""


_DENIED = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
"""What a broker answers to an operation its ACLs do not allow."""
_DENIED_CODES = {error.errno: error for error in _DENIED}
_DIAGNOSE_TIMEOUT = 5.0
"""Seconds the extra connection that finds out why the cluster is unreachable may take."""
_REFUSED_CERTIFICATE = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNKNOWN_CA",
    "ALERT_HANDSHAKE_FAILURE",
    "ALERT_ACCESS_DENIED",
)


def _principal(settings: KafkaSettings) -> str:
    """Who the cluster sees, in words."""
    if settings.sasl_mechanism is not None:
        return f"user {settings.sasl_username!r}"
    if settings.ssl_certfile is not None:
        return f"the subject of the client certificate {settings.ssl_certfile} (User:CN=...)"
    return "the anonymous user (User:ANONYMOUS)"


def denied(settings: KafkaSettings, what: str, error: BaseException) -> LogError:
    """The LogError for an operation the cluster's ACLs refused (``error`` one of _DENIED)."""
    if isinstance(error, TopicAuthorizationFailedError):
        grant = "on the pipeline's topics (Describe, Create, Read, Write)"
    elif isinstance(error, GroupAuthorizationFailedError):
        grant = "on its consumer group (Read, Describe; see --group-id)"
    elif isinstance(error, TransactionalIdAuthorizationFailed):
        grant = "on its transactional ids (Write, Describe; they start with the group name)"
    else:
        grant = "on the cluster (what the operation needs, e.g. IdempotentWrite or Create)"
    return LogError(
        f"Kafka at {settings.bootstrap_servers} denied {_principal(settings)} the right to "
        f"{what} ({type(error).__name__}): the cluster's ACLs do not allow it. Ask its "
        f"administrator to grant that principal ACLs {grant}, or run as a principal that has "
        "them"
    )


def _refusal(settings: KafkaSettings, error: BaseException) -> LogError | None:
    """The LogError that says why a connection attempt failed with ``error``, when it is a
    matter of security settings (None otherwise: an unreachable or hung broker)."""
    return _protocol_refusal(settings, error) or _certificate_refusal(settings, error)


def _protocol_refusal(settings: KafkaSettings, error: BaseException) -> LogError | None:
    """SASL refusals, and TLS spoken to a plaintext listener or the other way round."""
    at = f"Kafka at {settings.bootstrap_servers}"
    cause = error.__cause__ or error.__context__
    if isinstance(error, SaslAuthenticationFailed):
        return LogError(
            f"{at} refused the SASL credentials of user {settings.sasl_username!r} "
            f"({settings.sasl_mechanism}): the user is unknown or the password is wrong. Check "
            "--sasl-username (HEADWATER_SASL_USERNAME), the password in HEADWATER_SASL_PASSWORD "
            "and --sasl-mechanism"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return LogError(
            f"{at} does not accept the SASL mechanism {settings.sasl_mechanism}; set "
            "--sasl-mechanism (HEADWATER_SASL_MECHANISM) to one the cluster enables"
        )
    if isinstance(error, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(error):
        return LogError(
            f"{at} does not speak TLS on that port; check --security-protocol "
            f"(now {settings.security_protocol}) and --bootstrap-servers"
        )
    if (
        isinstance(error, KafkaConnectionError)
        and isinstance(cause, asyncio.IncompleteReadError)
        and settings.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT")
    ):
        return LogError(
            f"{at} closed the connection at the first request: it may expect TLS; check "
            f"--security-protocol (now {settings.security_protocol}) and --bootstrap-servers"
        )
    return None


def _certificate_refusal(settings: KafkaSettings, error: BaseException) -> LogError | None:
    """An untrusted broker certificate, or a client certificate missing or refused."""
    at = f"Kafka at {settings.bootstrap_servers}"
    cause = error.__cause__ or error.__context__
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = error.verify_message or "not verified"
        if "mismatch" in reason.lower():
            return LogError(
                f"the TLS certificate of {at} does not name the host it was reached at "
                f"({reason}): use a bootstrap address its certificate names, or, for a test "
                "cluster only, turn hostname checks off with --no-ssl-check-hostname"
            )
        return LogError(
            f"{at} presented a TLS certificate this client does not trust ({reason}): check "
            "--ssl-cafile (HEADWATER_SSL_CAFILE), which must be the CA that signed the "
            "brokers' certificates"
        )
    if not isinstance(cause, ssl.SSLError) or not any(
        alert in str(cause) for alert in _REFUSED_CERTIFICATE
    ):
        return None
    alert = str(cause.reason or cause).lower().replace("_", " ")
    if settings.ssl_certfile is None:
        return LogError(
            f"{at} requires a client certificate (mutual TLS) and closed the connection "
            f"({alert}); give one signed by a CA the cluster trusts with --ssl-certfile "
            "and --ssl-keyfile (HEADWATER_SSL_CERTFILE, HEADWATER_SSL_KEYFILE)"
        )
    return LogError(
        f"{at} refused the client certificate {settings.ssl_certfile} ({alert}): it is "
        "not signed by a CA the cluster trusts, or has expired; use a certificate the "
        "cluster's CA signed (--ssl-certfile, --ssl-keyfile)"
    )


async def _diagnose(settings: KafkaSettings) -> LogError | None:
    """Why the bootstrap servers cannot be used, when it is a matter of security settings:
    one connection (TLS handshake, SASL) to each in turn, as the client makes them."""
    options = settings.client_options()
    del options["bootstrap_servers"]
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            continue
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host.strip("[]"),
                    int(port),
                    request_timeout_ms=int(_DIAGNOSE_TIMEOUT * 1000),
                    **options,
                ),
                _DIAGNOSE_TIMEOUT,
            )
        except (TimeoutError, KafkaError, OSError) as error:
            refusal = _refusal(settings, error)
            if refusal is not None:
                return refusal
        else:
            conn.close()
    return None


async def _reach(
    settings: KafkaSettings, what: str, action: Awaitable[T] | Callable[[], Awaitable[T]]
) -> T:
    """``action``, or a clear LogError when the cluster does not answer in time, refuses this
    client's credentials or certificate, or denies the action by its ACLs. Given as a function
    that makes the request, an action that fails with an error Kafka calls retriable (a broker
    that died, a coordinator or leader moving to another broker) is made again until the
    connect timeout is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout
    try:
        while True:
            attempt = action() if callable(action) else action
            try:
                return await asyncio.wait_for(attempt, max(deadline - loop.time(), 0.001))
            except KafkaError as error:
                if not (callable(action) and error.retriable):
                    raise
                if loop.time() + _RETRY_BACKOFF >= deadline:
                    raise
            await asyncio.sleep(_RETRY_BACKOFF)
    except _DENIED as error:
        raise denied(settings, what, error) from error
    except (TimeoutError, KafkaError, OSError) as error:
        if not isinstance(error, TimeoutError):
            refusal = await _diagnose(settings)
            if refusal is not None:
                raise refusal from error
        detail = str(error) or type(error).__name__
        raise LogError(
            f"cannot {what} on Kafka at {settings.bootstrap_servers} within "
            f"{settings.connect_timeout:g}s ({detail}); check --bootstrap-servers "
            "(HEADWATER_BOOTSTRAP_SERVERS) and that the brokers are up",
            retriable=True,
        ) from error


def _partitions(tps: Sequence[TopicPartition]) -> list[KafkaPartition]:
    return [KafkaPartition(tp.topic, tp.partition) for tp in tps]


async def _started_producer(
    settings: KafkaSettings, transactional_id: str | None = None
) -> AIOKafkaProducer:
    """An idempotent producer with acks=all and the settings' batch size, started."""
    client = AIOKafkaProducer(
        **settings.client_options(),
        acks="all",
        enable_idempotence=True,
        transactional_id=transactional_id,
        max_batch_size=settings.producer_batch_bytes,
        max_request_size=max(4 << 20, settings.producer_batch_bytes),
    )
    try:
        await _reach(settings, "start a producer", client.start())
    except LogError:
        await client.stop()
        raise
    return client


def _sends(settings: KafkaSettings, client: AIOKafkaProducer, *, acks: bool) -> Sends:
    return Sends(client, linger=settings.producer_linger_ms / 1000, acks=acks)


class KafkaProducer(Producer):
    """An idempotent aiokafka producer that queues batches per partition and hands them over
    in the background (see :mod:`pipelines.log._kafka_sends`)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._client: AIOKafkaProducer | None = None  # created on first send
        self._sends: Sends | None = None

    async def _started(self) -> Sends:
        if self._sends is None:
            self._client = await _started_producer(self._settings)
            self._sends = _sends(self._settings, self._client, acks=True)
        return self._sends

    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        if not len(batch):
            return
        sends = await self._started()
        try:
            await sends.send(topic, partition, batch)
        except KafkaError as error:
            raise LogError(f"Kafka did not take a batch: {error}", retriable=True) from error

    async def flush(self) -> None:
        if self._sends is None:
            return
        try:
            await asyncio.gather(*await self._sends.drain())
        except KafkaError as error:
            raise LogError(f"Kafka did not acknowledge a batch: {error}", retriable=True) from error

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self.flush()
            finally:
                await self._client.stop()
                self._client = self._sends = None


class KafkaTransaction(TransactionalProducer):
    """A transactional aiokafka producer: batches and consumed offsets commit together.

    ``transactional_id`` is stable per task (group, sub-topology, partition), so when a task
    moves, the new owner's producer fences the old one: a zombie can no longer commit. Batches
    are queued and handed over in the background as :class:`KafkaProducer` does; a commit
    first waits until every one of them is in the transaction.
    """

    def __init__(self, settings: KafkaSettings, transactional_id: str) -> None:
        self._settings = settings
        self._id = transactional_id
        self._client: AIOKafkaProducer | None = None
        self._sends: Sends | None = None
        self._open = False  # a transaction has begun and not ended

    def _fenced(self, cause: BaseException | None = None) -> FencedError:
        return FencedError(
            f"transactional id {self._id!r} was taken over by a newer producer (the task's "
            f"next owner): this owner's open transaction is aborted{f' ({cause})' if cause else ''}"
        )

    def _check(self, producer: AIOKafkaProducer) -> None:
        """Raise :class:`FencedError` if the client has learnt, in its background sender,
        that it was fenced: it then refuses every transactional call (with an assertion)."""
        if producer._txn_manager.is_fatal_error():
            _retrieve_fatal_error(producer)
            raise self._fenced()

    async def fence(self) -> None:
        """Start the client: its ``InitProducerId`` bumps the id's epoch, which fences an
        earlier producer, and the coordinator first completes a transaction it left open."""
        await self._started()

    async def _started(self) -> tuple[AIOKafkaProducer, Sends]:
        if self._client is None or self._sends is None:
            self._client = await _started_producer(self._settings, transactional_id=self._id)
            self._sends = _sends(self._settings, self._client, acks=False)
        return self._client, self._sends

    async def _begun(self) -> tuple[AIOKafkaProducer, Sends]:
        client, sends = await self._started()
        self._check(client)
        if not self._open:
            await client.begin_transaction()
            self._open = True
        return client, sends

    async def send(self, topic: str, partition: int, batch: RawBatch) -> None:
        if not len(batch):
            return
        _, sends = await self._begun()
        with self._failures("adding batches to"):
            await sends.send(topic, partition, batch)

    @contextlib.contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """Raise :class:`FencedError` for a failure of ``what`` once the client knows it was
        fenced (it then fails calls with an assertion of its own), a retriable LogError for
        any other failure of the client."""
        try:
            yield
        except LogError:
            raise
        except Exception as error:
            fatal = self._client is not None and self._client._txn_manager.is_fatal_error()
            if isinstance(error, ProducerFenced) or fatal:
                raise self._fenced(error) from error
            if isinstance(error, KafkaError):
                raise LogError(
                    f"{what} transaction {self._id!r} failed: {error}", retriable=True
                ) from error
            raise

    async def commit(self, offsets: Mapping[TopicPartition, int], group: str) -> None:
        if self._client is None and not offsets:
            return
        producer, sends = await self._begun()
        with self._failures("committing"):
            await sends.drain()  # every batch in the transaction before it ends
            if offsets:
                await producer.send_offsets_to_transaction(
                    {KafkaPartition(tp.topic, tp.partition): o for tp, o in offsets.items()},
                    group,
                )
            self._check(producer)
            await producer.commit_transaction()
            self._open = False

    async def abort(self) -> None:
        if self._sends is not None:
            await self._sends.cancel()
        if self._client is not None and self._open:
            self._open = False
            if not self._client._txn_manager.is_fatal_error():  # a fenced one has nothing open
                await self._client.abort_transaction()

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self.abort()
            finally:
                await self._client.stop()
                _retrieve_fatal_error(self._client)  # (the sender may learn it as it stops)
                self._client = self._sends = None


def _retrieve_fatal_error(producer: AIOKafkaProducer) -> None:
    """Take the error of a fenced producer off the future aiokafka sets it on and nothing
    awaits; else asyncio logs "Future exception was never retrieved" with its traceback when
    the future is collected, wherever the program is then (in CPython 3.11, inside an
    ``ast.parse`` that such a log breaks)."""
    manager = producer._txn_manager
    waiter = getattr(manager, "_transaction_waiter", None)
    if manager is None or not manager.is_fatal_error() or waiter is None:
        return
    if waiter.done() and not waiter.cancelled():
        waiter.exception()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: RebalanceListener, consumer: KafkaConsumer) -> None:
        self._listener = listener
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Sequence[KafkaPartition]) -> None:
        gone = frozenset(TopicPartition(tp.topic, tp.partition) for tp in revoked)
        if gone:
            await self._listener.on_revoked(gone)  # may still commit them
        self._consumer.forget(gone)

    async def on_partitions_assigned(self, assigned: Sequence[KafkaPartition]) -> None:
        new = frozenset(TopicPartition(tp.topic, tp.partition) for tp in assigned)
        self._consumer.owned |= new
        if not new:
            return
        try:
            await self._listener.on_assigned(new)
        except Exception as error:  # (aiokafka would only log it)
            self._consumer.fail(error)


class KafkaConsumer(Consumer):
    """A member of a Kafka consumer group with manual commits (see the module docstring)."""

    def __init__(self, log: KafkaLog, group: str) -> None:
        self._log = log
        self._settings = log.settings
        self._consumer = AIOKafkaConsumer(
            **self._settings.client_options(),
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=32 << 20,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
        )
        self._listener: _Listener | None = None
        self._columns: ColumnReader | None = None  # once started
        self.owned: frozenset[TopicPartition] = frozenset()
        self._returned: dict[TopicPartition, int] = {}  # offset after what poll returned
        self._failure: Exception | None = None
        """What taking assigned partitions on raised, for the next :meth:`poll` to raise:
        aiokafka runs the rebalance callbacks in its own task and only logs their errors, and
        the worker would go on polling without the tasks of those partitions."""

    async def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        existing = await self._log.describe_topics()
        missing = [t for t in topics if t not in existing]
        if missing:
            raise TopicError(f"cannot subscribe to missing topic(s) {', '.join(missing)}")
        await _reach(self._settings, "join the consumer group", self._consumer.start())
        self._columns = ColumnReader(self._consumer)
        self._listener = _Listener(listener, self)
        self._consumer.subscribe(list(topics), listener=self._listener)

    def fail(self, error: Exception) -> None:
        """Raise ``error`` from the next :meth:`poll` (the first one, if several)."""
        if self._failure is None:
            self._failure = error

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def poll(self, max_records: int, timeout: float) -> list[FetchedBatch]:
        if self._columns is None:
            raise LogError("poll() before subscribe()")
        self._raise_failure()
        try:
            batches = await self._columns.fetch((), timeout, max_records)
        except _DENIED as error:  # (the group's join, refused, is raised from the fetch)
            raise denied(self._settings, "consume in its consumer group", error) from error
        self._raise_failure()  # (a rebalance during the fetch: no records of its partitions)
        for batch in batches:
            self._returned[batch.topic_partition] = batch.next_offset
        if not batches:
            batches = await self._past_control_records()
        return batches

    async def _past_control_records(self) -> list[FetchedBatch]:
        """Empty batches for the partitions whose position moved past records no one sees
        (transaction markers), so that committing the position drains them."""
        moved = []
        for tp in self.owned:
            kafka_tp = KafkaPartition(tp.topic, tp.partition)
            try:
                position = await self._consumer.position(kafka_tp)
            except KafkaError:
                continue  # not fetched yet: nothing to move
            if position > self._returned.get(tp, position):
                self._returned[tp] = position
                moved.append(
                    FetchedBatch(tp.topic, tp.partition, RawBatch([], [], []), [], position)
                )
            self._returned.setdefault(tp, position)
        return moved

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        foreign = [str(tp) for tp in offsets if tp not in self.owned]
        if foreign:
            raise LogError(f"cannot commit partitions this member does not own: {foreign}")
        if not offsets:
            return
        try:
            await self._consumer.commit(
                {
                    KafkaPartition(tp.topic, tp.partition): OffsetAndMetadata(o, "")
                    for tp, o in offsets.items()
                }
            )
        except KafkaError as error:
            raise LogError(f"committing offsets failed: {error}", retriable=True) from error

    def assignment(self) -> frozenset[TopicPartition]:
        return self.owned

    def forget(self, partitions: frozenset[TopicPartition]) -> None:
        """Stop owning ``partitions`` (they were revoked)."""
        self.owned -= partitions
        for tp in partitions:
            self._returned.pop(tp, None)

    async def close(self) -> None:
        try:
            if self._listener is not None and self.owned:
                await self._listener.on_partitions_revoked(
                    [KafkaPartition(tp.topic, tp.partition) for tp in self.owned]
                )
        finally:
            await self._consumer.stop()


class KafkaLog(LogBackend):
    """Apache Kafka as the pipeline's log."""

    name = "kafka"

    def __init__(self, settings: KafkaSettings | None = None) -> None:
        self.settings = settings or KafkaSettings()
        self._admin: AIOKafkaAdminClient | None = None
        self._reader: ColumnReader | None = None

    async def _admin_client(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            admin = AIOKafkaAdminClient(**self.settings.client_options())
            await _reach(self.settings, "connect", admin.start())
            self._admin = admin
        return self._admin

    async def _reader_client(self) -> ColumnReader:
        if self._reader is None:
            reader = AIOKafkaConsumer(
                **self.settings.client_options(),
                group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed",
            )
            await _reach(self.settings, "connect", reader.start())
            self._reader = ColumnReader(reader)
        return self._reader

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        admin = await self._admin_client()
        existing = await self.describe_topics()
        for spec in specs:
            found = existing.get(spec.name)
            if found is not None and found.partitions != spec.partitions:
                raise TopicError(
                    f"topic {spec.name!r} exists on Kafka with {found.partitions} partitions, "
                    f"not {spec.partitions}; give the topic another name, or change its "
                    "declared partition count to match"
                )
            if spec.partitions < 1:
                raise TopicError(f"topic {spec.name!r} needs at least one partition")
        wanted = [spec for spec in specs if spec.name not in existing]
        if not wanted:
            return
        replicas = self.settings.replication_factor
        if replicas is None:
            cluster = await _reach(self.settings, "describe the cluster", admin.describe_cluster)
            replicas = max(1, min(_DEFAULT_REPLICAS, len(cluster.get("brokers", ()))))
        new = [
            NewTopic(spec.name, spec.partitions, replicas, topic_configs=_topic_configs(spec))
            for spec in wanted
        ]
        try:
            response = await _reach(self.settings, "create topics", admin.create_topics(new))
        except TopicAlreadyExistsError:
            response = None
        for name, code, *_ in getattr(response, "topic_errors", ()):
            if code in _DENIED_CODES:
                raise denied(self.settings, f"create topic {name!r}", _DENIED_CODES[code]())
            if code not in (0, TopicAlreadyExistsError.errno):
                raise TopicError(f"Kafka refused to create topic {name!r} (error code {code})")
        await self._wait_for_topics([s.name for s in specs])

    async def _wait_for_topics(self, names: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.connect_timeout
        while loop.time() < deadline:
            if set(names) <= set(await self.describe_topics()):
                return
            await asyncio.sleep(0.1)
        raise TopicError(f"topics {list(names)} did not appear on Kafka in time")

    async def describe_topics(self) -> dict[str, TopicSpec]:
        admin = await self._admin_client()
        topics = await _reach(self.settings, "describe topics", admin.describe_topics)
        counts = {
            t["topic"]: len(t["partitions"])
            for t in topics
            if not t.get("error_code") and not t["topic"].startswith("__")
        }
        if not counts:
            return {}
        wanted = {"cleanup.policy": None, "retention.ms": None, "retention.bytes": None}
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, wanted) for name in counts]
        responses = await _reach(
            self.settings, "describe topics", lambda: admin.describe_configs(resources)
        )
        specs = {}
        for response in responses:
            for resource in response.to_object()["resources"]:
                name = resource["resource_name"]
                overrides = {
                    entry["config_names"]: entry["config_value"]
                    for entry in resource["config_entries"]
                    if entry.get("config_source") == _TOPIC_CONFIG
                }
                specs[name] = TopicSpec(
                    name,
                    counts[name],
                    compacted="compact" in overrides.get("cleanup.policy", ""),
                    retention_ms=_limit(overrides.get("retention.ms")),
                    retention_bytes=_limit(overrides.get("retention.bytes")),
                )
        return specs

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        reader = (await self._reader_client()).consumer
        ends = await _reach(
            self.settings, "read end offsets", lambda: reader.end_offsets(_partitions(partitions))
        )
        return {TopicPartition(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    async def start_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        reader = (await self._reader_client()).consumer
        starts = await _reach(
            self.settings,
            "read start offsets",
            lambda: reader.beginning_offsets(_partitions(partitions)),
        )
        return {TopicPartition(tp.topic, tp.partition): offset for tp, offset in starts.items()}

    async def purge(self, below: Mapping[TopicPartition, int]) -> None:
        """Delete the records below each offset (Kafka's DeleteRecords): the log start moves
        up at once, and the broker frees whole segments below it."""
        wanted = {
            KafkaPartition(tp.topic, tp.partition): RecordsToDelete(offset)
            for tp, offset in below.items()
            if offset > 0
        }
        if not wanted:
            return
        admin = await self._admin_client()
        await _reach(self.settings, "delete records", lambda: admin.delete_records(wanted))

    async def committed_offsets(
        self, group: str, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        admin = await self._admin_client()
        found = await _reach(
            self.settings,
            "read committed offsets",
            lambda: admin.list_consumer_group_offsets(group, partitions=_partitions(partitions)),
        )
        return {
            TopicPartition(tp.topic, tp.partition): meta.offset
            for tp, meta in found.items()
            if meta.offset >= 0
        }

    async def read(self, tp: TopicPartition, offset: int, max_records: int) -> FetchedBatch:
        columns = await self._reader_client()
        reader = columns.consumer
        kafka_tp = KafkaPartition(tp.topic, tp.partition)
        end = (await self.end_offsets([tp]))[tp]
        if offset >= end:
            return FetchedBatch(tp.topic, tp.partition, RawBatch([], [], []), [], offset)
        reader.assign([kafka_tp])
        reader.seek(kafka_tp, offset)
        deadline = asyncio.get_running_loop().time() + self.settings.connect_timeout
        while True:
            fetched = await columns.fetch([kafka_tp], _READ_POLL, max_records)
            if fetched:
                return fetched[0]
            # nothing: either only transaction markers are left before the end, or the broker
            # is slow; a restore must tell the two apart, never stop early
            position = await reader.position(kafka_tp)
            if position >= end:
                return FetchedBatch(tp.topic, tp.partition, RawBatch([], [], []), [], position)
            if asyncio.get_running_loop().time() > deadline:
                raise LogError(
                    f"reading {tp} from offset {position} (end {end}) made no progress within "
                    f"{self.settings.connect_timeout:g}s",
                    retriable=True,
                )

    def producer(self) -> Producer:
        return KafkaProducer(self.settings)

    def transactional_producer(self, transactional_id: str) -> TransactionalProducer:
        return KafkaTransaction(self.settings, transactional_id)

    def consumer(self, group: str) -> Consumer:
        return KafkaConsumer(self, group)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.consumer.stop()
            self._reader = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None


def _topic_configs(spec: TopicSpec) -> dict[str, str]:
    configs = {"cleanup.policy": "compact" if spec.compacted else "delete"}
    if spec.retention_ms is not None:
        configs["retention.ms"] = str(spec.retention_ms)
    if spec.retention_bytes is not None:
        configs["retention.bytes"] = str(spec.retention_bytes)
    return configs


def _limit(config: str | None) -> int | None:
    """A retention setting of a topic (None where it is not set, or -1: unlimited)."""
    if config is None or int(config) < 0:
        return None
    return int(config)
