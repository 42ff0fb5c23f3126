"""Connection settings for Apache Kafka, from CLI flags or ``HEADWATER_*`` environment variables.

Secrets are :class:`~pydantic.SecretStr`: they print as ``**********`` in logs, errors and
reprs, and are revealed only when handed to the Kafka client.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["KafkaSettings"]


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
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    replication_factor: int = 1
    """Replicas of the topics Headwater creates."""
    connect_timeout: float = 15.0
    """Seconds to wait for the cluster before failing with a clear error."""

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
            if self.ssl_certfile is not None:
                context.load_cert_chain(
                    str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None
                )
            options["ssl_context"] = context
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return options
