"""Settings from CLI flags or ``HEADWATER_*`` environment variables: how to reach Apache Kafka,
and how much state a worker keeps in memory.

Secrets are :class:`~pydantic.SecretStr`: they print as ``**********`` in logs, errors and
reprs, and are revealed only when handed to the Kafka client.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.errors import LogError

__all__ = ["KafkaSettings", "StateSettings"]


class KafkaSettings(BaseSettings):
    """How to reach a Kafka cluster. Every field reads ``HEADWATER_<FIELD>`` from the environment,
    e.g. ``HEADWATER_BOOTSTRAP_SERVERS=broker1:9092,broker2:9092``."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_", extra="ignore")

    bootstrap_servers: str = "localhost:9092"
    client_id: str = "headwater"
    group_id: str | None = None
    """The consumer group; defaults to the pipeline's name."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    """PEM file of the CA(s) that signed the brokers' certificates (default: the system's)."""
    ssl_certfile: Path | None = None
    """PEM file of this client's certificate, for brokers that require one (mutual TLS)."""
    ssl_keyfile: Path | None = None
    """PEM file of the certificate's private key (default: in ``ssl_certfile``)."""
    ssl_key_password: SecretStr | None = None
    """The password of an encrypted ``ssl_keyfile``: from ``HEADWATER_SSL_KEY_PASSWORD`` only."""
    ssl_check_hostname: bool = True
    """Check that a broker's certificate names the host it was reached at."""
    replication_factor: int | None = None
    """Replicas of the topics Headwater creates; by default as many as the cluster has brokers,
    up to 3 (so a topic on a cluster of 3 or more survives the loss of a broker)."""
    connect_timeout: float = 15.0
    """Seconds to wait for the cluster before failing with a clear error."""
    producer_linger_ms: float = Field(default=0.0, ge=0)
    """Milliseconds a producer waits, once records are queued for a partition whose queue was
    empty, before it hands them to the client: fewer, bigger produce requests at low rates,
    for that much latency. Under load the queue batches anyway: what is sent while the
    previous batch of a partition waits for the broker goes in its next batch."""
    producer_batch_bytes: int = Field(default=1 << 20, ge=1 << 10)
    """The largest Kafka record batch a producer builds, in bytes: at most the topics'
    ``max.message.bytes`` (1 MiB by default). Queued records that need more go as several."""

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.ssl_context()
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return options

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS settings as an :class:`ssl.SSLContext`; a :class:`LogError` that names the
        file and the setting when a CA, certificate or key cannot be loaded."""
        try:
            context = ssl.create_default_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
        except (OSError, ssl.SSLError) as error:
            raise LogError(
                f"cannot load the CA certificates from {self.ssl_cafile} ({_reason(error)}); "
                "check --ssl-cafile (HEADWATER_SSL_CAFILE): a PEM file of the CA that signed "
                "the brokers' certificates"
            ) from None
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile is None:
            if self.ssl_keyfile is not None:
                raise LogError(
                    "--ssl-keyfile (HEADWATER_SSL_KEYFILE) is set without a certificate; "
                    "give the client certificate with --ssl-certfile (HEADWATER_SSL_CERTFILE)"
                )
            return context
        password = self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
        try:
            context.load_cert_chain(
                str(self.ssl_certfile),
                str(self.ssl_keyfile) if self.ssl_keyfile else None,
                password=password or (lambda: ""),  # never prompt on the terminal
            )
        except (OSError, ssl.SSLError) as error:
            raise LogError(
                f"cannot load the client certificate {self.ssl_certfile} with key "
                f"{self.ssl_keyfile or self.ssl_certfile} ({_reason(error)}); check "
                "--ssl-certfile and --ssl-keyfile (HEADWATER_SSL_CERTFILE, "
                "HEADWATER_SSL_KEYFILE): PEM files of a certificate and its private key, and "
                "HEADWATER_SSL_KEY_PASSWORD if the key is encrypted"
            ) from None
        return context


class StateSettings(BaseSettings):
    """How each stateful step's store uses memory and its local copy (see
    :mod:`pipelines.state.store` and :mod:`pipelines.runtime.state`). Every field reads
    ``HEADWATER_STATE_<FIELD>``, e.g. ``HEADWATER_STATE_CACHE_KEYS=200000``."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_STATE_", extra="ignore")

    cache_keys: int = Field(default=500_000, ge=1)
    """Entries a store (one step on one partition) keeps in memory; the rest stay in its local
    copy on disk. A worker's state takes about ``cache_keys`` x its stores x ~150 bytes (a
    short key and a number; more for larger values), plus the keys changed between two
    checkpoints. Runs without a state directory (in process, tests) keep everything."""
    copy_interval: float = Field(default=0.0, ge=0)
    """Seconds between two writes of the local copies of a store that fits in memory (0: at
    every checkpoint, the default); a crash replays the changelog written since the last one.
    Experimental above 0: with 10 s, exactly-once chaos runs on Kafka under heavy load
    (``tests/chaos/test_exactly_once.py``) ended with a task's restored state and its
    committed offsets disagreeing in about one run in three. Two causes are fixed since: a copy
    written late claimed the changelog's end at the time of writing, past what another owner
    had written meanwhile (:meth:`~pipelines.runtime.state.TaskState.persist`), and a task's
    new owner read its offsets and restored before fencing the earlier owner, which could
    still commit meanwhile (:meth:`~pipelines.runtime.checkpoint.Checkpoint.fence`). With
    both, 4 runs of 4 passed at 10 s on a loaded machine (one failed of four with the first
    alone): too few to make it the default. Since a checkpoint's changes stopped taking fresh
    heap (:meth:`~pipelines.state.store.KeyValueStore.changes`), a copy at every checkpoint
    costs about 10% of a keyed count over 1M keys (it cost 20%): see
    docs/benchmarks-stateful.md."""


def _reason(error: OSError | ssl.SSLError) -> str:
    """What went wrong loading a file, without the file's content."""
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error.strerror or type(error).__name__).lower().replace("_", " ")
    return error.strerror or str(error)
