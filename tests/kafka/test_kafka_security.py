"""Headwater on a Kafka broker that demands authentication, TLS and ACLs, end to end.

The broker is the SECURED one of ``KAFKA_SECURED=1 bash scripts/kafka.sh start`` (a second
broker, separate from the PLAINTEXT test broker): SCRAM-SHA-512 over TLS on one listener, TLS
with a required client certificate on another, ACLs enforced. It is found through
``HEADWATER_TEST_KAFKA_SECURED`` (its SASL_SSL address, default ``127.0.0.1:9192``) and
``HEADWATER_TEST_KAFKA_SECURED_DIR`` (its state directory, default
``/tmp/headwater-kafka-secured``), where the script writes ``secured.env``: the mutual-TLS
address, the CA, the client certificates and keys, and the users' passwords. A test **fails**
(never skips) when that broker does not answer.

What is checked, each through ``headwater run --backend kafka`` as a user runs it:

- a keyed exactly-once count (JsonLines -> key_by -> count -> JsonLinesSink) as the
  ``pipeline`` user over SASL_SSL, once the admin has granted it ACLs on its names: the output
  is the count computed from the input alone;
- the same over mutual TLS, as the principal of the client certificate (``User:CN=...``);
- a wrong password, an unknown user, an untrusted CA on the client side, no client
  certificate, a client certificate from an untrusted CA, and no ACLs granted: each ends the
  run with status 2 and one ``headwater:`` paragraph naming the cause, and no password ever
  shows in the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest
from pydantic import SecretStr
from support.cli import assert_user_error, headwater
from support.kafka import probe

from pipelines.errors import LogError
from pipelines.log.base import TopicPartition, TopicSpec
from pipelines.log.kafka import KafkaLog
from pipelines.settings import KafkaSettings

SECURED_BOOTSTRAP = os.environ.get("HEADWATER_TEST_KAFKA_SECURED", "127.0.0.1:9192")
SECURED_DIR = Path(
    os.environ.get("HEADWATER_TEST_KAFKA_SECURED_DIR", "/tmp/headwater-kafka-secured")
)
START_HINT = (
    "start it with `KAFKA_SECURED=1 bash scripts/kafka.sh start` and point "
    "HEADWATER_TEST_KAFKA_SECURED (its SASL_SSL address) and HEADWATER_TEST_KAFKA_SECURED_DIR "
    "(its state directory) at it"
)
RUN_TIMEOUT = 120.0

# Kafka's ACL protocol constants (org.apache.kafka.common.resource / acl).
_TOPIC, _GROUP, _TRANSACTIONAL_ID = 2, 3, 5
_PREFIXED = 4
_ALL = 2
_ALLOW = 3


@dataclass(frozen=True)
class Secured:
    """The secured broker: addresses, files and credentials from its ``secured.env``."""

    sasl_bootstrap: str
    ssl_bootstrap: str
    ca: str
    admin_user: str
    admin_password: str
    pipeline_user: str
    pipeline_password: str
    client_cert: str
    client_key: str
    client_key_password: str
    client_principal: str
    untrusted_ca: str
    untrusted_cert: str
    untrusted_key: str

    def secrets(self) -> list[str]:
        """Every password of the broker's users and keys."""
        return [self.admin_password, self.pipeline_password, self.client_key_password]


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
    return values


def _admin(secured: Secured) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=secured.sasl_bootstrap,
        security_protocol="SASL_SSL",
        ssl_context=ssl.create_default_context(cafile=secured.ca),
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username=secured.admin_user,
        sasl_plain_password=secured.admin_password,
        request_timeout_ms=10_000,
    )


@pytest.fixture(scope="module")
def secured() -> Secured:
    """The secured broker, once its admin user gets an answer (the test fails otherwise)."""
    env_file = SECURED_DIR / "secured.env"
    if not env_file.is_file():
        pytest.fail(
            f"no {env_file}: the secured Kafka broker is not running; {START_HINT}", pytrace=False
        )
    e = _read_env_file(env_file)
    found = Secured(
        sasl_bootstrap=SECURED_BOOTSTRAP,
        ssl_bootstrap=e["KAFKA_SECURED_SSL_BOOTSTRAP"],
        ca=e["KAFKA_SECURED_CA"],
        admin_user=e["KAFKA_SECURED_ADMIN_USER"],
        admin_password=e["KAFKA_SECURED_ADMIN_PASSWORD"],
        pipeline_user=e["KAFKA_SECURED_PIPELINE_USER"],
        pipeline_password=e["KAFKA_SECURED_PIPELINE_PASSWORD"],
        client_cert=e["KAFKA_SECURED_CLIENT_CERT"],
        client_key=e["KAFKA_SECURED_CLIENT_KEY"],
        client_key_password=e["KAFKA_SECURED_CLIENT_KEY_PASSWORD"],
        client_principal=e["KAFKA_SECURED_CLIENT_PRINCIPAL"],
        untrusted_ca=e["KAFKA_SECURED_UNTRUSTED_CA"],
        untrusted_cert=e["KAFKA_SECURED_UNTRUSTED_CLIENT_CERT"],
        untrusted_key=e["KAFKA_SECURED_UNTRUSTED_CLIENT_KEY"],
    )
    try:
        asyncio.run(asyncio.wait_for(probe(lambda: _admin(found), "headwater-security-probe"), 30))
    except Exception as error:
        pytest.fail(
            f"the secured Kafka broker at {SECURED_BOOTSTRAP} does not answer its admin "
            f"({type(error).__name__}: {error}); {START_HINT}",
            pytrace=False,
        )
    return found


async def _grant(
    secured: Secured,
    principal: str,
    prefix: str,
    resources: Sequence[int] = (_TOPIC, _GROUP, _TRANSACTIONAL_ID),
) -> None:
    """Allow ``principal`` everything on the ``resources`` (by default the topics, groups and
    transactional ids) whose names start with ``prefix``, as the admin (prefixed ACLs)."""
    admin = _admin(secured)
    try:
        await admin.start()
        for resource in resources:
            request = CreateAclsRequest(resource, prefix, _PREFIXED, principal, "*", _ALL, _ALLOW)
            response = await admin._send_request(request)
            for code, message in response.creation_responses:
                assert code == 0, f"creating an ACL failed: error {code} {message}"
    finally:
        await admin.close()


async def _delete_topics(secured: Secured, prefix: str) -> None:
    admin = _admin(secured)
    try:
        await admin.start()
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


@pytest.fixture
def prefix(secured: Secured) -> Iterator[str]:
    """A name prefix unique to this test (pipeline, topics, group, transactional ids); the
    topics under it are deleted afterwards."""
    name = f"sec-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(Exception):
        asyncio.run(asyncio.wait_for(_delete_topics(secured, name), 30))


MODULE = """
from connectors import JsonLines, JsonLinesSink
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("{name}", processing_guarantee="exactly_once")
    .source(JsonLines("input.jsonl"), into=Topic("{name}-in", partitions=3))
    .key_by("by-user", lambda event: event["user"])
    .count("events-per-user")
    .sink(JsonLinesSink("out/counts.jsonl"))
)
"""


def _pipeline(directory: Path, name: str) -> tuple[Path, Counter[str]]:
    """The pipeline module and its input in ``directory``; the count the input implies."""
    users = [f"user-{(i * 7) % 13}" for i in range(400)]
    (directory / "input.jsonl").write_bytes(
        b"".join(orjson.dumps({"user": u, "n": i}) + b"\n" for i, u in enumerate(users))
    )
    module = directory / "security_pipeline.py"
    module.write_text(MODULE.format(name=name))
    return module, Counter(users)


def _final_counts(directory: Path) -> dict[str, Any]:
    """The last count written for each key (the sink appends every update)."""
    final: dict[str, Any] = {}
    for line in (directory / "out" / "counts.jsonl").read_bytes().splitlines():
        row = orjson.loads(line)
        final[row["key"]] = row["value"]
    return final


def _sasl(
    secured: Secured, user: str, password: str, *, ca: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Flags and environment of a SASL_SSL (SCRAM-SHA-512) run."""
    flags = [
        "--backend",
        "kafka",
        "--bootstrap-servers",
        secured.sasl_bootstrap,
        "--security-protocol",
        "SASL_SSL",
        "--sasl-mechanism",
        "SCRAM-SHA-512",
        "--sasl-username",
        user,
        "--ssl-cafile",
        ca or secured.ca,
    ]
    env = {"HEADWATER_SASL_PASSWORD": password, "HEADWATER_CONNECT_TIMEOUT": "10"}
    return flags, env


def _mtls(
    secured: Secured, cert: str | None, key: str | None, key_password: str | None
) -> tuple[list[str], dict[str, str]]:
    """Flags and environment of an SSL run, with the client certificate ``cert`` if given."""
    flags = [
        "--backend",
        "kafka",
        "--bootstrap-servers",
        secured.ssl_bootstrap,
        "--security-protocol",
        "SSL",
        "--ssl-cafile",
        secured.ca,
    ]
    if cert is not None and key is not None:
        flags += ["--ssl-certfile", cert, "--ssl-keyfile", key]
    env = {"HEADWATER_CONNECT_TIMEOUT": "10"}
    if key_password is not None:
        env["HEADWATER_SSL_KEY_PASSWORD"] = key_password
    return flags, env


def _run_secured(
    module: Path, flags: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``headwater run MODULE --no-progress FLAGS`` in ``cwd`` with ``env``."""
    return headwater("run", module, "--no-progress", *flags, cwd=cwd, env=env, timeout=RUN_TIMEOUT)


def _assert_no_secret(secured: Secured, stdout: str, stderr: str, *more: str) -> None:
    for secret in [*secured.secrets(), *more]:
        assert secret not in stdout, "a password shows on stdout"
        assert secret not in stderr, "a password shows on stderr"


# -- the pipeline runs -------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_exactly_once_count_over_sasl_ssl_as_a_scram_user_with_acls(
    secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """The ``pipeline`` user, granted ACLs on its names only, runs a keyed exactly-once count
    over SASL_SSL; the output is the count of the input."""
    asyncio.run(_grant(secured, f"User:{secured.pipeline_user}", prefix))
    module, expected = _pipeline(tmp_path, prefix)
    flags, env = _sasl(secured, secured.pipeline_user, secured.pipeline_password)
    result = _run_secured(module, flags, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert _final_counts(tmp_path) == dict(expected)
    _assert_no_secret(secured, result.stdout, result.stderr)


def _broker_log() -> list[str]:
    """The lines of the secured broker's log (its authorizer logs every denial there)."""
    return (Path(SECURED_DIR) / "broker.log").read_text(errors="replace").splitlines()


_RESOURCES = {"Topic": _TOPIC, "Group": _GROUP, "TransactionalId": _TRANSACTIONAL_ID}
_OPERATIONS = {
    "READ": 3,
    "WRITE": 4,
    "CREATE": 5,
    "DELETE": 6,
    "DESCRIBE": 8,
    "DESCRIBE_CONFIGS": 10,
}
_LITERAL = 3


async def _grant_exactly(secured: Secured, principal: str, acls: list[dict[str, Any]]) -> None:
    """Allow ``principal`` each operation of each ACL ``headwater acls --json`` printed."""
    admin = _admin(secured)
    try:
        await admin.start()
        for acl in acls:
            pattern = _PREFIXED if acl["prefixed"] else _LITERAL
            for operation in acl["operations"]:
                request = CreateAclsRequest(
                    _RESOURCES[acl["resource"]],
                    acl["name"],
                    pattern,
                    principal,
                    "*",
                    _OPERATIONS[operation],
                    _ALLOW,
                )
                response = await admin._send_request(request)
                for code, message in response.creation_responses:
                    assert code == 0, f"creating an ACL failed: error {code} {message}"
    finally:
        await admin.close()


@pytest.mark.timeout(180)
def test_the_acls_headwater_acls_prints_are_enough_to_run(
    secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """``headwater acls`` derives the ACLs from the pipeline (its topics, group and, under
    exactly-once, transactional ids); granted exactly those and nothing else, the ``pipeline``
    user runs the exactly-once count, and the output is the count of the input."""
    module, expected = _pipeline(tmp_path, prefix)
    principal = f"User:{secured.pipeline_user}"
    listed = headwater("acls", module, "--principal", principal, "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    acls = orjson.loads(listed.stdout)
    assert {(a["resource"], a["name"]) for a in acls} >= {
        ("Topic", f"{prefix}-in"),
        ("Group", prefix),
        ("TransactionalId", f"{prefix}."),
    }
    asyncio.run(_grant_exactly(secured, principal, acls))
    flags, env = _sasl(secured, secured.pipeline_user, secured.pipeline_password)
    # purges of the repartition topic (DeleteRecords) as often as the run can: DELETE granted
    result = _run_secured(
        module, flags, {**env, "HEADWATER_HOUSEKEEPING_SECONDS": "0.05"}, tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert _final_counts(tmp_path) == dict(expected)
    denied = [line for line in _broker_log() if f"{principal} is Denied" in line and prefix in line]
    assert not denied, f"the broker denied the run what it asked for: {denied[:3]}"
    text = headwater("acls", module, "--principal", principal, cwd=tmp_path).stdout
    assert f"--allow-principal {principal} --operation Describe --operation Write " in text
    assert f"--transactional-id {prefix}. --resource-pattern-type prefixed" in text


@pytest.mark.timeout(180)
def test_exactly_once_count_over_mutual_tls_as_the_certificate_principal(
    secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """A client certificate (with an encrypted key) is the principal ``User:CN=...`` the ACLs
    are granted to; the same count over the SSL listener that requires client certificates."""
    asyncio.run(_grant(secured, secured.client_principal, prefix))
    module, expected = _pipeline(tmp_path, prefix)
    flags, env = _mtls(
        secured, secured.client_cert, secured.client_key, secured.client_key_password
    )
    result = _run_secured(module, flags, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert _final_counts(tmp_path) == dict(expected)
    _assert_no_secret(secured, result.stdout, result.stderr)


# -- refusals ----------------------------------------------------------------------------------

WRONG_PASSWORD = "not-the-password-7f3a9c"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("user", ["pipeline", "nobody"])
def test_a_wrong_password_or_unknown_user_is_one_paragraph(
    user: str, secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """SCRAM refuses a wrong password, or a user the cluster does not know: status 2, one
    paragraph naming the user and the settings to check, and no password anywhere."""
    asyncio.run(_grant(secured, f"User:{user}", prefix))
    module, _ = _pipeline(tmp_path, prefix)
    flags, env = _sasl(secured, user, WRONG_PASSWORD)
    result = _run_secured(module, flags, env, tmp_path)
    message = assert_user_error(
        result, f"refused the SASL credentials of user '{user}'", "HEADWATER_SASL_PASSWORD"
    )
    assert secured.sasl_bootstrap in message
    _assert_no_secret(secured, result.stdout, result.stderr, WRONG_PASSWORD)


@pytest.mark.timeout(90)
def test_a_broker_certificate_from_an_untrusted_ca_is_one_paragraph(
    secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """The client trusts another CA than the one that signed the broker's certificate: status
    2, one paragraph saying the broker's certificate is not trusted and to check --ssl-cafile."""
    module, _ = _pipeline(tmp_path, prefix)
    flags, env = _sasl(
        secured, secured.pipeline_user, secured.pipeline_password, ca=secured.untrusted_ca
    )
    result = _run_secured(module, flags, env, tmp_path)
    assert_user_error(
        result, "presented a TLS certificate this client does not trust", "--ssl-cafile"
    )
    _assert_no_secret(secured, result.stdout, result.stderr)


@pytest.mark.timeout(90)
def test_no_client_certificate_on_the_mutual_tls_listener_is_one_paragraph(
    secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """The SSL listener requires a client certificate and none is given: status 2, one
    paragraph saying so and naming --ssl-certfile."""
    module, _ = _pipeline(tmp_path, prefix)
    flags, env = _mtls(secured, None, None, None)
    result = _run_secured(module, flags, env, tmp_path)
    assert_user_error(result, "requires a client certificate", "--ssl-certfile")
    _assert_no_secret(secured, result.stdout, result.stderr)


@pytest.mark.timeout(90)
def test_a_client_certificate_from_an_untrusted_ca_is_one_paragraph(
    secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """A client certificate with the right subject but signed by a CA the broker does not
    trust (ACLs granted to that subject, so only the signature is wrong): status 2, one
    paragraph saying the broker refused that certificate."""
    asyncio.run(_grant(secured, secured.client_principal, prefix))
    module, _ = _pipeline(tmp_path, prefix)
    flags, env = _mtls(secured, secured.untrusted_cert, secured.untrusted_key, None)
    result = _run_secured(module, flags, env, tmp_path)
    assert_user_error(
        result, f"refused the client certificate {secured.untrusted_cert}", "--ssl-certfile"
    )
    _assert_no_secret(secured, result.stdout, result.stderr)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("listener", ["sasl_ssl", "mtls"])
def test_no_acls_granted_is_one_paragraph(
    listener: str, secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """An authenticated principal without any ACL on the pipeline's names: status 2, one
    paragraph saying the cluster's ACLs denied it, naming the principal and what to grant."""
    module, _ = _pipeline(tmp_path, prefix)
    if listener == "sasl_ssl":
        flags, env = _sasl(secured, secured.pipeline_user, secured.pipeline_password)
        who = f"user '{secured.pipeline_user}'"
    else:
        flags, env = _mtls(
            secured, secured.client_cert, secured.client_key, secured.client_key_password
        )
        who = "the subject of the client certificate"
    result = _run_secured(module, flags, env, tmp_path)
    assert_user_error(result, f"denied {who}", "ACLs", "grant")
    _assert_no_secret(secured, result.stdout, result.stderr)
    principal = (
        f"User:{secured.pipeline_user}" if listener == "sasl_ssl" else secured.client_principal
    )
    assert any(
        f"Principal = {principal} is Denied" in line and prefix in line for line in _broker_log()
    ), "the broker's log shows no denial of the run"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("withheld", "needle"),
    [(_GROUP, "on its consumer group"), (_TRANSACTIONAL_ID, "on its transactional ids")],
    ids=["group", "transactional-id"],
)
def test_a_missing_acl_names_what_to_grant(
    withheld: int, needle: str, secured: Secured, prefix: str, tmp_path: Path
) -> None:
    """ACLs on the topics but not on the consumer group, or not on the transactional ids of
    exactly-once: status 2, one paragraph naming the principal and the missing grant."""
    granted = [r for r in (_TOPIC, _GROUP, _TRANSACTIONAL_ID) if r != withheld]
    asyncio.run(_grant(secured, f"User:{secured.pipeline_user}", prefix, granted))
    module, _ = _pipeline(tmp_path, prefix)
    flags, env = _sasl(secured, secured.pipeline_user, secured.pipeline_password)
    result = _run_secured(module, flags, env, tmp_path)
    assert_user_error(result, f"denied user '{secured.pipeline_user}'", needle)
    _assert_no_secret(secured, result.stdout, result.stderr)


class _NoRebalanceWork:
    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        del partitions

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        del partitions


@pytest.mark.timeout(120)
async def test_a_refused_group_join_is_a_log_error_from_poll(secured: Secured, prefix: str) -> None:
    """A principal that may use the topics but not the consumer group: aiokafka raises the
    group join's refusal from the fetch, and poll says it as Headwater's error. (A worker that
    let it through died with a traceback, printed after the runner's paragraph.)"""
    await _grant(secured, f"User:{secured.pipeline_user}", prefix, [_TOPIC])
    log = KafkaLog(
        KafkaSettings(
            bootstrap_servers=secured.sasl_bootstrap,
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username=secured.pipeline_user,
            sasl_password=SecretStr(secured.pipeline_password),
            ssl_cafile=Path(secured.ca),
            connect_timeout=10,
        )
    )
    topic = f"{prefix}-in"
    consumer = log.consumer(f"{prefix}-group")
    try:
        await log.create_topics([TopicSpec(topic, 1)])
        await consumer.subscribe([topic], _NoRebalanceWork())
        with pytest.raises(LogError, match=r"denied user .*on its consumer group"):
            for _ in range(100):
                await consumer.poll(100, 0.1)
    finally:
        await consumer.close()
        await log.close()
