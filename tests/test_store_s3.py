"""The S3 backend over real HTTP: the contract suite against a local moto server, plus what only
S3 has — credentials, regions, encryption options, errors a person can act on, and faults
injected by a proxy between the store and the server (see ``s3server.py``)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import structlog

from s3server import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    FaultProxy,
    MotoS3,
    aws_env,
    drop_response,
    moto_s3_config,
    reset_request_after,
    reset_response_after,
    respond,
    stall,
    strip_conditions,
)
from store_contract import StoreContract
from watcherd import log
from watcherd.config import S3Config, StoreURL, parse_store_url
from watcherd.errors import ObjectMissing, PreconditionFailed, StoreError, StoreUnavailable
from watcherd.store.s3 import S3Store

MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
PREFIX = "pre/fix"
_AWS_VARS_TO_CLEAR = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                      "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_SESSION_NAME",
                      "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS",
                      "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto():
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def fake_aws(monkeypatch):
    """Fake static keys from the environment, and nothing else the credential chain could find."""
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def bucket(moto):
    return moto.new_bucket()


@pytest.fixture
def proxy(moto):
    p = FaultProxy(moto.address).start()
    yield p
    p.stop()


@pytest.fixture
def make_store(fake_aws, moto, bucket):
    """S3Store factory: straight to moto, or through ``via`` (a proxy URL); short timeouts."""
    stores: list[S3Store] = []

    def make(via: str | None = None, *, prefix: str = PREFIX, bucket_name: str | None = None,
             **kwargs) -> S3Store:
        cfg_keys = {k: kwargs.pop(k) for k in list(kwargs) if k in S3Config.__dataclass_fields__}
        cfg = moto_s3_config(via or moto.endpoint, **cfg_keys)
        kwargs.setdefault("connect_timeout", 2)
        kwargs.setdefault("read_timeout", 5)
        kwargs.setdefault("part_size", 5 * MiB)
        kwargs.setdefault("multipart_threshold", 5 * MiB)
        url = StoreURL("s3", bucket=bucket_name or bucket, prefix=prefix)
        store = S3Store(url, cfg, **kwargs)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


def _file(tmp_path: Path, data: bytes, name: str = "src.bundle") -> tuple[Path, int, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, len(data), hashlib.sha256(data).hexdigest()


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# -- the contract -----------------------------------------------------------------------------------


class TestS3Store(StoreContract):
    """Every promise of the Store protocol, over HTTP against moto (12 MiB uploads go multipart)."""

    @pytest.fixture
    def store(self, make_store):
        return make_store()


@pytest.mark.s3_external
class TestS3StoreExternal(StoreContract):
    """The same promises against a real S3 or S3-compatible server, when one is given:
    ``WATCHERD_TEST_S3_BUCKET`` (required), ``WATCHERD_TEST_S3_ENDPOINT`` (empty = AWS),
    ``WATCHERD_TEST_S3_PATH_STYLE=1``, credentials and region from the usual AWS_* variables.
    Every test works under a fresh ``watcherd-test/<random>`` prefix and deletes it afterwards."""

    @pytest.fixture
    def store(self):
        bucket_name = os.environ.get("WATCHERD_TEST_S3_BUCKET")
        if not bucket_name:
            pytest.skip("no external S3: set WATCHERD_TEST_S3_BUCKET (and WATCHERD_TEST_S3_ENDPOINT, "
                        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) to run against one")
        cfg = S3Config(endpoint_url=os.environ.get("WATCHERD_TEST_S3_ENDPOINT", ""),
                       force_path_style=os.environ.get("WATCHERD_TEST_S3_PATH_STYLE", "") == "1")
        url = StoreURL("s3", bucket=bucket_name, prefix=f"watcherd-test/{uuid.uuid4().hex[:12]}")
        store = S3Store(url, cfg)
        yield store
        for obj in store.list(""):
            store.delete(obj.name)
        store.close()


# -- names, listing, import weight ------------------------------------------------------------------


def test_importing_the_store_package_does_not_load_the_aws_sdk():
    probe = ("import sys, watcherd.store, watcherd.store.local, watcherd.config\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'boto3', 'botocore', 's3transfer'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert out == "[]"
    # and the check can fail: the S3 backend does load it
    out = subprocess.run([sys.executable, "-c", probe.replace("watcherd.config\n",
                                                              "watcherd.config, watcherd.store.s3\n")],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert "botocore" in out


def test_object_names_are_keys_under_the_url_prefix(make_store, moto, bucket):
    store = make_store(prefix="tenants/eu")
    store.write("acme/app/manifest.json", b"{}", if_version=None)
    assert moto.keys(bucket) == ["tenants/eu/acme/app/manifest.json"]
    assert store.url == f"s3://{bucket}/tenants/eu"


def test_a_url_without_prefix_uses_the_bucket_root(make_store, moto, bucket):
    store = make_store(prefix="")
    store.write("acme/app/manifest.json", b"{}", if_version=None)
    assert moto.keys(bucket) == ["acme/app/manifest.json"]
    assert [o.name for o in store.list("acme")] == ["acme/app/manifest.json"]


def test_open_store_builds_an_s3_store_from_config(fake_aws, moto, bucket):
    from watcherd.config import StoreConfig
    from watcherd.store import open_store

    config = StoreConfig(url=parse_store_url(f"s3://{bucket}/p"), s3=moto_s3_config(moto.endpoint))
    store = open_store(config)
    try:
        assert isinstance(store, S3Store)
        assert store.read("k/manifest.json") is None
    finally:
        store.close()


def test_list_follows_pagination(make_store):
    store = make_store()
    store._list_page_size = 2  # 7 objects -> 4 pages
    for i in range(7):
        store.write(f"k/bundles/{i}-x.bundle", b"x" * i, if_version=None)
    listed = store.list("k/")
    assert [o.name for o in listed] == [f"k/bundles/{i}-x.bundle" for i in range(7)]
    assert [o.size for o in listed] == list(range(7))


def test_list_hides_objects_that_are_not_store_names(make_store, moto, bucket):
    store = make_store()
    store.write("k/manifest.json", b"{}", if_version=None)
    moto.client().put_object(Bucket=bucket, Key=f"{PREFIX}/k/.watcherd-probe-left-over", Body=b"")
    moto.client().put_object(Bucket=bucket, Key=f"{PREFIX}/k/has space", Body=b"")
    assert [o.name for o in store.list("k")] == ["k/manifest.json"]


# -- the conditional-write probe --------------------------------------------------------------------


def test_probe_finds_conditional_writes_and_leaves_nothing_behind(make_store, moto, bucket):
    store = make_store()
    assert store.conditional_writes is None
    assert store.probe_conditional_writes(near="acme/app/manifest.json") is True
    assert store.conditional_writes is True
    assert moto.keys(bucket) == []


def test_probe_runs_once_beside_the_first_write_and_never_for_reads(make_store, proxy):
    store = make_store(proxy.url)
    store.read("acme/app/manifest.json")
    assert store.conditional_writes is None
    v = store.write("acme/app/manifest.json", b"1", if_version=None)
    store.write("acme/app/manifest.json", b"2", if_version=v)
    probes = [s for s in proxy.seen if ".watcherd-probe-" in s.path]
    assert store.conditional_writes is True
    assert {s.method for s in probes} == {"PUT", "DELETE"} and len(probes) == 4
    assert all(s.path.startswith(f"/{store.bucket}/{PREFIX}/acme/app/.watcherd-probe-")
               for s in probes)


def test_a_server_that_ignores_conditional_headers_is_detected_and_said(make_store, proxy):
    proxy.fail(strip_conditions(), times=1000)
    store = make_store(proxy.url)
    with structlog.testing.capture_logs() as logs:
        assert store.probe_conditional_writes() is False
    warning = [e for e in logs if e["event"] == "s3.conditional_writes"]
    assert warning[0]["log_level"] == "warning" and "best-effort" in warning[0]["hint"]
    # best effort: a plain create over an existing manifest is still refused (check-then-write)
    v1 = store.write("k/manifest.json", b"one", if_version=None)
    with pytest.raises(PreconditionFailed):
        store.write("k/manifest.json", b"two", if_version=None)
    with pytest.raises(PreconditionFailed):
        store.write("k/manifest.json", b"two", if_version='"stale"')
    assert store.write("k/manifest.json", b"two", if_version=v1)
    assert store.read("k/manifest.json").data == b"two"


def test_a_server_that_rejects_conditional_headers_gets_none(make_store, proxy, tmp_path):
    for header in ("If-None-Match", "If-Match"):
        proxy.fail(respond(501, "NotImplemented", f"{header} is not supported"), header=header,
                   times=1000)
    store = make_store(proxy.url)
    assert store.probe_conditional_writes() is False
    v1 = store.write("k/manifest.json", b"one", if_version=None)
    with pytest.raises(PreconditionFailed):
        store.write("k/manifest.json", b"two", if_version=None)
    store.write("k/manifest.json", b"two", if_version=v1)
    src, size, sha = _file(tmp_path, os.urandom(6 * MiB))
    store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    with pytest.raises(PreconditionFailed):
        store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    applied = proxy.faults_applied()
    assert len(applied) == 1 and ".watcherd-probe-" in applied[0].path  # never sent again


def test_a_probe_that_cannot_write_does_not_block_the_real_write(make_store, proxy):
    proxy.fail(respond(403, "AccessDenied"), method="PUT", path=".watcherd-probe-")
    store = make_store(proxy.url)
    with structlog.testing.capture_logs() as logs:
        store.write("k/manifest.json", b"{}", if_version=None)
    assert any(e["event"] == "s3.probe_failed" for e in logs)
    assert store.conditional_writes is None  # tried again before the next write


# -- options: region, encryption, storage class, credentials ----------------------------------------


@pytest.mark.parametrize("env, cfg_region, expected", [
    ({"AWS_REGION": "eu-west-3"}, "", ("eu-west-3", "AWS_REGION")),
    ({"AWS_DEFAULT_REGION": "eu-central-1"}, "", ("eu-central-1", "AWS_DEFAULT_REGION")),
    ({"AWS_REGION": "eu-west-3"}, "ap-south-1", ("ap-south-1", "config")),
    ({}, "", ("us-east-1", "default")),
])
def test_region_comes_from_config_or_the_environment_and_is_logged(fake_aws, moto, monkeypatch,
                                                                   env, cfg_region, expected):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = S3Config(endpoint_url=moto.endpoint, force_path_style=True, region=cfg_region)
    with structlog.testing.capture_logs() as logs:
        store = S3Store(StoreURL("s3", bucket="any-bucket"), cfg)
    store.close()
    event = next(e for e in logs if e["event"] == "s3.client")
    assert (event["region"], event["region_source"]) == expected
    assert store.region == expected[0]


def test_sse_on_bundles_and_manifest_storage_class_on_bundles_only(make_store, moto, bucket, tmp_path):
    store = make_store(sse="AES256", storage_class="STANDARD_IA")
    store.write("k/manifest.json", b"{}", if_version=None)
    small, size, sha = _file(tmp_path, b"small bundle", "small")
    store.upload("k/bundles/1-a.bundle", small, size=size, sha256=sha)
    large, size, sha = _file(tmp_path, os.urandom(11 * MiB), "large")
    store.upload("k/bundles/2-b.bundle", large, size=size, sha256=sha)
    s3 = moto.client()
    manifest = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/k/manifest.json")
    assert manifest["ServerSideEncryption"] == "AES256"
    assert manifest.get("StorageClass", "STANDARD") == "STANDARD"
    for name in ("1-a", "2-b"):
        head = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/k/bundles/{name}.bundle")
        assert head["ServerSideEncryption"] == "AES256"
        assert head["StorageClass"] == "STANDARD_IA"


def test_sse_kms_sends_the_key_id(make_store, moto, bucket, tmp_path):
    key_id = moto.client("kms").create_key()["KeyMetadata"]["Arn"]
    store = make_store(sse="aws:kms", kms_key_id=key_id)
    src, size, sha = _file(tmp_path, b"bundle")
    store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    head = moto.client().head_object(Bucket=bucket, Key=f"{PREFIX}/k/bundles/1-a.bundle")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key_id


def test_credentials_from_a_shared_file_are_masked_in_logs(fake_aws, make_store, monkeypatch, tmp_path):
    secret = "shared-file-secret-" + uuid.uuid4().hex
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = AKIASHAREDFILE000001\n"
                     f"aws_secret_access_key = {secret}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    store = make_store()
    with structlog.testing.capture_logs() as logs:
        store.write("k/manifest.json", b"{}", if_version=None)
    assert next(e for e in logs if e["event"] == "s3.credentials")["source"] == "shared-credentials-file"
    assert log.redact(f"key={secret}") == "key=********"


def test_irsa_web_identity_needs_no_static_keys(moto, bucket, tmp_path):
    """AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, STS pointed at moto; moto checks signatures of
    everything after the (unsigned) AssumeRoleWithWebIdentity call, so the S3 requests must be
    signed with the credentials STS issued. Runs in a subprocess with only these variables."""
    role = moto.iam_role(actions=("s3:*",))
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.sig")
    env = {"PATH": os.environ.get("PATH", ""), "AWS_ROLE_ARN": role,
           "AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ENDPOINT_URL_STS": moto.endpoint,
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
    code = f"""
import json, sys
from watcherd import log
from watcherd.config import S3Config, StoreURL
from watcherd.store.s3 import S3Store
log.configure(fmt="json", stream=sys.stderr)
store = S3Store(StoreURL("s3", bucket={bucket!r}, prefix="p"),
                S3Config(endpoint_url={moto.endpoint!r}, force_path_style=True, max_attempts=2))
store.write("acme/app/manifest.json", b"irsa", if_version=None)
creds = store._session.get_credentials().get_frozen_credentials()
print(json.dumps({{"data": store.read("acme/app/manifest.json").data.decode(),
                  "key": creds.access_key, "masked": log.redact(creds.secret_key)}}))
"""
    with moto.auth(free_requests=1):
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             cwd=ROOT, timeout=30)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["data"] == "irsa"
    assert result["key"].startswith("ASIA")  # temporary credentials from STS
    assert result["masked"] == "********"
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert {"event": "s3.credentials", "source": "assume-role-with-web-identity"}.items() <= \
        next(e for e in events if e["event"] == "s3.credentials").items()


# -- errors a person can act on ---------------------------------------------------------------------


def test_no_such_bucket_names_the_bucket(make_store):
    store = make_store(bucket_name="watcherd-no-such-bucket")
    with pytest.raises(StoreError) as err:
        store.read("k/manifest.json")
    assert not isinstance(err.value, StoreUnavailable)
    assert "watcherd-no-such-bucket" in _one_line(err.value) and "does not exist" in str(err.value)


def test_connection_refused_is_transient_and_names_the_endpoint(make_store):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = make_store(f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(StoreUnavailable) as err:
        store.read("k/manifest.json")
    assert f"127.0.0.1:{port}" in _one_line(err.value) and "connection refused" in str(err.value)
    assert f"{PREFIX}/k/manifest.json" in str(err.value)


def test_an_endpoint_that_does_not_resolve_says_so(make_store):
    store = make_store("http://watcherd-test.invalid:9000", max_attempts=1)
    with pytest.raises(StoreUnavailable) as err:
        store.read("k/manifest.json")
    assert "does not resolve" in _one_line(err.value)


def test_no_credentials_at_all_says_where_credentials_come_from(make_store, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = make_store()
    with pytest.raises(StoreError) as err:
        store.read("k/manifest.json")
    assert "no AWS credentials" in _one_line(err.value) and "AWS_WEB_IDENTITY_TOKEN_FILE" in str(err.value)


def test_wrong_credentials_fail_in_one_line_and_fixed_credentials_work(make_store, moto, bucket,
                                                                       monkeypatch):
    key_id, secret = moto.iam_user()
    with moto.auth():
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-" + secret)
        with pytest.raises(StoreError) as err:
            make_store().write("k/manifest.json", b"{}", if_version=None)
        assert "SignatureDoesNotMatch" in _one_line(err.value) and "secret" in str(err.value)
        assert f"{PREFIX}/k/manifest.json" in str(err.value)
        assert not isinstance(err.value, StoreUnavailable)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODYHASTHIS001")
        with pytest.raises(StoreError, match="InvalidAccessKeyId"):
            make_store().read("k/manifest.json")

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        store = make_store()
        assert store.read("k/manifest.json") is None  # the failed write left nothing
        store.write("k/manifest.json", b"{}", if_version=None)
        assert store.read("k/manifest.json").data == b"{}"


def test_access_denied_names_the_action_and_the_key(make_store, moto, monkeypatch):
    key_id, secret = moto.iam_user(actions=("s3:GetObject", "s3:ListBucket"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with moto.auth():
        store = make_store()
        assert store.read("k/manifest.json") is None
        with pytest.raises(StoreError) as err:
            store.write("k/manifest.json", b"{}", if_version=None)
    message = _one_line(err.value)
    assert message.startswith("access denied: s3:PutObject on s3://")
    assert message.split(" (")[0].endswith(f"{PREFIX}/k/manifest.json")


def test_expired_credentials_are_reported_as_such(make_store, proxy):
    proxy.fail(respond(400, "ExpiredToken", "The provided token has expired."), method="GET")
    store = make_store(proxy.url)
    with pytest.raises(StoreError) as err:
        store.read("k/manifest.json")
    assert "expired" in _one_line(err.value) and not isinstance(err.value, StoreUnavailable)


def test_throttling_is_retried_by_botocore_then_reported_as_transient(make_store, proxy):
    proxy.fail(respond(503, "SlowDown", "Please reduce your request rate."), method="GET", times=2)
    store = make_store(proxy.url, max_attempts=2)
    with pytest.raises(StoreUnavailable) as err:
        store.read("k/manifest.json")
    assert "throttling" in _one_line(err.value) and "after 2 attempts" in str(err.value)
    assert len(proxy.faults_applied()) == 2


def test_secrets_never_appear_in_error_messages(make_store, proxy, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-" + uuid.uuid4().hex)
    proxy.fail(respond(403, "AccessDenied", f"denied for {FAKE_SECRET} {os.environ['AWS_SESSION_TOKEN']}"))
    store = make_store(proxy.url)
    with pytest.raises(StoreError) as err:
        store.read("k/manifest.json")
    assert FAKE_SECRET not in str(err.value) and os.environ["AWS_SESSION_TOKEN"] not in str(err.value)
    assert FAKE_KEY_ID not in str(err.value)


def test_a_conditional_request_conflict_is_a_lost_race(make_store, proxy):
    store = make_store(proxy.url)
    store.probe_conditional_writes()
    proxy.fail(respond(409, "ConditionalRequestConflict"), method="PUT", path="/manifest.json")
    with pytest.raises(PreconditionFailed):
        store.write("k/manifest.json", b"{}", if_version=None)


# -- faults: nothing partial is ever visible, and the next attempt succeeds -------------------------


def test_transient_5xx_on_a_bundle_upload_is_retried_inside_the_call(make_store, proxy, tmp_path):
    store = make_store(proxy.url)
    proxy.fail(respond(500, "InternalError"), method="PUT", path="/1-a.bundle")
    src, size, sha = _file(tmp_path, b"bundle bytes")
    store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    assert [s.action for s in proxy.seen if s.path.endswith("/1-a.bundle") and s.method == "PUT"] == \
        ["respond 500 InternalError", "pass"]


def test_a_connection_reset_mid_upload_is_retried_inside_the_call(make_store, proxy, tmp_path):
    store = make_store(proxy.url)
    proxy.fail(reset_request_after(1000), method="PUT", path="/1-a.bundle")
    src, size, sha = _file(tmp_path, os.urandom(200_000))
    store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    out = tmp_path / "out"
    store.download("k/bundles/1-a.bundle", out)
    assert out.read_bytes() == src.read_bytes()


def test_a_multipart_upload_that_keeps_failing_is_aborted_and_publishes_nothing(
        make_store, proxy, moto, bucket, tmp_path):
    store = make_store(proxy.url, max_attempts=2)
    store.probe_conditional_writes()
    proxy.fail(reset_request_after(64 * 1024), method="PUT", path="partNumber=2", times=2)
    src, size, sha = _file(tmp_path, os.urandom(12 * MiB))
    with pytest.raises(StoreUnavailable) as err:
        store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    assert "k/bundles/1-a.bundle" in _one_line(err.value)
    assert moto.keys(bucket) == [] and moto.multipart_uploads(bucket) == []
    # the daemon's next attempt
    store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    out = tmp_path / "out"
    assert store.download("k/bundles/1-a.bundle", out) == size
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha


def test_a_multipart_source_that_does_not_match_is_aborted(make_store, moto, bucket, tmp_path):
    store = make_store()
    src, size, sha = _file(tmp_path, os.urandom(11 * MiB))
    with pytest.raises(StoreError, match="does not match its checksum"):
        store.upload("k/bundles/1-a.bundle", src, size=size, sha256="0" * 64)
    with pytest.raises(StoreError, match="does not match its checksum"):  # file grew after spooling
        store.upload("k/bundles/1-a.bundle", src, size=size - MiB, sha256=sha)
    assert moto.keys(bucket) == [] and moto.multipart_uploads(bucket) == []


def test_a_lost_response_to_a_landed_manifest_write_is_our_win(make_store, proxy):
    store = make_store(proxy.url)
    v1 = store.write("k/manifest.json", b"one", if_version=None)
    proxy.fail(drop_response(), method="PUT", path="/manifest.json")
    with structlog.testing.capture_logs() as logs:
        v2 = store.write("k/manifest.json", b"two", if_version=v1)  # retry meets its own write: 412
    assert [e["event"] for e in logs] == ["s3.retry_met_own_write"]
    blob = store.read("k/manifest.json")
    assert blob.data == b"two" and blob.version == v2
    assert [s.action for s in proxy.seen if s.path.endswith("/manifest.json") and s.method == "PUT"][-2:] \
        == ["drop response", "pass"]


def test_a_stall_past_the_read_timeout_is_retried_and_resolved(make_store, proxy):
    store = make_store(proxy.url, read_timeout=0.5)
    store.probe_conditional_writes()
    proxy.fail(stall(3, forward=True), method="PUT", path="/manifest.json")
    with structlog.testing.capture_logs() as logs:
        v1 = store.write("k/manifest.json", b"one", if_version=None)  # landed, answer lost
    assert [e["event"] for e in logs] == ["s3.retry_met_own_write"]
    proxy.fail(stall(3), method="PUT", path="/manifest.json")
    v2 = store.write("k/manifest.json", b"two", if_version=v1)  # never arrived, sent again
    assert store.read("k/manifest.json").version == v2
    assert [s.action for s in proxy.seen if s.path.endswith("/manifest.json")
            and s.method == "PUT"] == ["stall 3s after forwarding", "pass", "stall 3s", "pass"]


def test_a_lost_response_to_a_completed_multipart_upload_is_our_win(make_store, proxy, tmp_path):
    store = make_store(proxy.url)
    proxy.fail(drop_response(), method="POST", path="uploadId=")
    src, size, sha = _file(tmp_path, os.urandom(11 * MiB))
    store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    assert [o.name for o in store.list("k")] == ["k/bundles/1-a.bundle"]


def test_a_failed_manifest_swap_leaves_the_old_manifest_and_the_next_attempt_wins(make_store, proxy):
    store = make_store(proxy.url, max_attempts=2)
    v1 = store.write("k/manifest.json", b"generation 1", if_version=None)
    proxy.fail(respond(503, "ServiceUnavailable"), method="PUT", path="/manifest.json", times=2)
    with pytest.raises(StoreUnavailable):
        store.write("k/manifest.json", b"generation 2", if_version=v1)
    blob = store.read("k/manifest.json")
    assert (blob.data, blob.version) == (b"generation 1", v1)
    v2 = store.write("k/manifest.json", b"generation 2", if_version=v1)
    assert store.read("k/manifest.json").version == v2


def test_a_download_whose_connection_breaks_resumes_where_it_stopped(make_store, proxy, tmp_path):
    store = make_store(proxy.url)
    data = os.urandom(11 * MiB)
    src, size, sha = _file(tmp_path, data)
    store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
    proxy.fail(reset_response_after(3 * MiB), method="GET", path="/bundles/", times=2)
    out = tmp_path / "out"
    with structlog.testing.capture_logs() as logs:
        assert store.download("k/bundles/1-a.bundle", out) == size
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
    assert sum(e["event"] == "s3.download_resume" for e in logs) == 2


def test_a_download_of_an_object_that_vanished_is_object_missing(make_store, tmp_path):
    store = make_store()
    with pytest.raises(ObjectMissing):
        store.download("k/bundles/1-a.bundle", tmp_path / "out")
    store.write("k/x", b"", if_version=None)
    assert store.download("k/x", tmp_path / "empty") == 0  # an empty object is not missing


def test_log_lines_of_a_failing_store_carry_no_secret(make_store, proxy, monkeypatch):
    stream = io.StringIO()
    log.configure(level="debug", fmt="json", stream=stream)
    try:
        proxy.fail(respond(503, "SlowDown", f"x {FAKE_SECRET}"), times=10)
        store = make_store(proxy.url, max_attempts=1)
        with pytest.raises(StoreUnavailable):
            store.write("k/manifest.json", b"{}", if_version=None)
    finally:
        structlog.reset_defaults()
    assert "s3.client" in stream.getvalue()
    assert FAKE_SECRET not in stream.getvalue()


# -- config check reports whether split-brain protection holds ------------------------------------


def _config_check(tmp_path: Path, endpoint: str, bucket: str, capsys) -> str:
    from watcherd.cli import main

    cfg = tmp_path / "watcherd.toml"
    cfg.write_text(f'[store]\nurl = "s3://{bucket}/{PREFIX}"\nkey = "acme/app"\n'
                   f'[store.s3]\nendpoint_url = "{endpoint}"\nforce_path_style = true\n'
                   'region = "us-east-1"\nmax_attempts = 2\n')
    try:
        assert main(["--config", str(cfg), "config", "check"]) == 0
    finally:
        structlog.reset_defaults()  # main() pointed logging at pytest's captured stdout
    return capsys.readouterr().out


def test_config_check_says_the_store_enforces_conditional_writes(tmp_path, fake_aws, moto, bucket,
                                                                 capsys):
    out = _config_check(tmp_path, moto.endpoint, bucket, capsys)
    assert "# store: conditional writes are enforced" in out


def test_config_check_warns_when_the_server_ignores_conditional_writes(tmp_path, fake_aws, moto,
                                                                      bucket, proxy, capsys):
    proxy.fail(strip_conditions(), times=1000)
    out = _config_check(tmp_path, proxy.url, bucket, capsys)
    assert "conditional writes are IGNORED" in out


def test_config_check_still_succeeds_when_the_store_does_not_answer(tmp_path, fake_aws, bucket,
                                                                   capsys):
    out = _config_check(tmp_path, "http://127.0.0.1:9", bucket, capsys)
    assert "# store: not checked, the store did not answer" in out


def test_stale_multipart_uploads_of_this_key_are_aborted_and_others_left(make_store):
    # What a daemon killed mid-upload leaves: parts billed and invisible in listings.
    store = make_store()
    client = store._client
    mine = client.create_multipart_upload(Bucket=store.bucket, Key=f"{PREFIX}/acme/ws/bundles/1-x.bundle")
    other = client.create_multipart_upload(Bucket=store.bucket, Key=f"{PREFIX}/acme/other/bundles/1-y.bundle")

    # moto reports every upload as started in 2010; a threshold older than that keeps them all
    # (an upload younger than the threshold may be a live one of a racing pod).
    assert store.abort_stale_uploads("acme/ws/", older_than=100 * 365 * 86400) == 0
    assert store.abort_stale_uploads("acme/ws/", older_than=0) == 1

    left = {u["UploadId"] for u in client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", ())}
    assert mine["UploadId"] not in left and other["UploadId"] in left
